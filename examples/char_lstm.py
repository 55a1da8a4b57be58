"""A character-level LSTM language model with the API (gf.embedding, gf.lstm, a linear head),
trained and sampled as examples/char_gpt.py.

    python examples/char_lstm.py --steps 300 --data book.txt
"""

import argparse

import gpuflow as gf
from gpuflow.data import SequenceBatches, load_text
from gpuflow.optim import Adam, clip_grad_norm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=500)
parser.add_argument("--hidden", type=int, default=128)
parser.add_argument("--context", type=int, default=64)
parser.add_argument("--data", default="python-docs", help="a UTF-8 text file")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

ids, vocabulary = load_text(args.data)
batches = SequenceBatches(ids, args.context, 32, seed=0, drop_last=True)  # last 10% held out
V, H = len(vocabulary), args.hidden

x, y = gf.Input(name="ids"), gf.Input(name="y")
h, _ = gf.embedding(x, V, 32, name="embed", rng=0)          # (N, T) -> (N, T, 32)
h, _ = gf.lstm(h, 32, H, name="lstm", rng=1)                 # (N, T, H), torch's layout
logits, _ = gf.dense(h, H, V, name="head", rng=gf.layers.host_rng(2))  # (N, T, V)
graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=args.device, inputs=[x, y],
                 outputs=[logits])
opt = Adam(graph, lr=3e-3)

step = 0
while step < args.steps:
    for xb, yb in batches:
        graph.step(xb, yb)
        clip_grad_norm(graph, 1.0)
        opt.step()
        step += 1
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            held = [(graph.item(graph.run(None, a, b)), a.size)
                    for a, b in batches.held_out_batches()]
            print(f"step {step}: held-out {sum(l * n for l, n in held) / sum(n for _, n in held):.4f}"
                  " nats/char")
        if step == args.steps:
            break

prompt = [vocabulary.index(c) for c in "The " if c in vocabulary] or [0]
sample = gf.generate(graph, logits, prompt, 300, temperature=0.8, seed=0)  # the whole prefix
print("".join(vocabulary[i] for i in sample))
