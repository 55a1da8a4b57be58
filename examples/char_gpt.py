"""A character-level GPT with the API: what `gpuflow train --model gpt` does, in one page.

    python examples/char_gpt.py                      # 2 blocks of width 128 on Python's docs
    python examples/char_gpt.py --steps 50 --width 32 --data book.txt
"""

import argparse

import gpuflow as gf
from gpuflow.data import SequenceBatches, load_text
from gpuflow.optim import AdamW, WarmupCosineLR, clip_grad_norm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--width", type=int, default=128)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--context", type=int, default=64)
parser.add_argument("--data", default="python-docs", help="a UTF-8 text file")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

ids, vocabulary = load_text(args.data)                 # character ids, and the characters
batches = SequenceBatches(ids, args.context, 32, seed=0, drop_last=True)  # last 10% held out

x, y = gf.Input(name="ids"), gf.Input(name="y")
logits, params = gf.layers.gpt(x, len(vocabulary), args.context, args.width, args.layers,
                               heads=4, rng=0)
graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=args.device, inputs=[x, y],
                 outputs=[logits])
opt = AdamW(graph, lr=3e-3)
schedule = WarmupCosineLR(opt, warmup=max(1, args.steps // 10), T_max=args.steps)


def held_out_loss():
    """Mean loss over the held-out tail, in nats per character."""
    pairs = list(batches.held_out_batches())
    return sum(graph.item(graph.run(None, xb, yb)) * xb.size for xb, yb in pairs) / sum(
        xb.size for xb, _ in pairs)


step = 0
while step < args.steps:
    for xb, yb in batches:                             # a fresh order every epoch
        graph.step(xb, yb)                             # forward and backward
        clip_grad_norm(graph, 1.0)
        opt.step()
        schedule.step()                                # once per step
        step += 1
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step}: held-out {held_out_loss():.4f} nats/char")
        if step == args.steps:
            break

prompt = [vocabulary.index(c) for c in "The " if c in vocabulary] or [0]
sample = gf.generate(graph, logits, prompt, 300, temperature=0.8, seed=0)
print("".join(vocabulary[i] for i in sample))
