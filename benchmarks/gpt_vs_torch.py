"""`gpuflow train --model gpt` beside the same run in PyTorch eager: the same initial weights,
the same batches in the same order, the same optimizer, schedule and clipping.

    python benchmarks/gpt_vs_torch.py [--steps 1000] [--eval-every 100] [--threads 1]

gpuflow's side is the CLI's run, built by gpuflow/models.py and cli/textrun.py (their defaults:
2 blocks, width 128, 4 heads, context 64, float32, AdamW lr 3e-3, WarmupCosineLR stepped per
step with a warm-up over the first tenth, global gradient norm clipped at 1.0, batch 32, the
last tenth of the bundled corpus held out). PyTorch's side is gpuflow.bench's TorchGPT (an
nn.Module equal to gf.layers.gpt) loaded with gpuflow's initial weights through
export_weights, trained with torch.optim.AdamW (the same betas, eps, weight decay 0.01),
SequentialLR(LinearLR, CosineAnnealingLR) (equal to WarmupCosineLR, tests/test_schedules.py)
and clip_grad_norm_(1.0). The steps alternate, one gpuflow step then one torch step on the
same batch, so the machine's load falls on both alike. Fairness: both sides get the same thread
count, --threads (default 1): NumPy's OpenBLAS threads and torch.set_num_threads (an OpenBLAS
left at all cores while torch gets one thread would not be the same run, and on a loaded
machine its spinning threads slow gpuflow's products). Every --eval-every steps it prints both
held-out losses (nats/char, the same held-out windows) and each side's training time so far
(held-out evaluation excluded).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this gpuflow

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import gpuflow as gf  # noqa: E402
from gpuflow.bench.floor_torch import TorchGPT  # noqa: E402
from gpuflow.bench.machine import set_threads  # noqa: E402
from gpuflow.bench.workloads import GPTWorkload  # noqa: E402
from gpuflow.checkpoint import export_weights  # noqa: E402
from gpuflow.cli import TrainOptions, textrun  # noqa: E402
from gpuflow.models import build_gpt  # noqa: E402
from gpuflow.cli.runs import make_schedule  # noqa: E402
from gpuflow.data import SequenceBatches, load_text  # noqa: E402
from gpuflow.optim import clip_grad_norm, make_optimizer  # noqa: E402


def gpuflow_run(opts: TrainOptions, vocab: int) -> tuple:
    """The CLI's graph, loss, optimizer and schedule (textrun.train_gpt's, without --resume)."""
    ids, y, logits, loss, arch = build_gpt(opts, vocab)
    graph = gf.Graph(loss, device=opts.device, dtype=opts.dtype, inputs=[ids, y],
                     outputs=[logits])
    optimizer = make_optimizer(opts.optimizer, graph, opts.lr)
    return graph, loss, optimizer, make_schedule(opts.schedule, optimizer, opts.steps), arch


def torch_run(opts: TrainOptions, graph: gf.Graph, vocab: int) -> tuple:
    """TorchGPT holding `graph`'s weights (export_weights' torch names and layouts), AdamW and
    SequentialLR(LinearLR, CosineAnnealingLR) with the rates of WarmupCosineLR."""
    w = GPTWorkload("cli", vocab, opts.context, opts.width, opts.layers, opts.heads,
                    opts.batch_size)
    model = TorchGPT(w)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "initial.safetensors")
        export_weights(graph, path)
        model.load_state_dict(load_file(path))  # strict: every key and shape
    model = model.to(getattr(torch, opts.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    warmup = max(1, opts.steps // 10)  # as cli/runs.py's warmup-cosine
    s = torch.optim.lr_scheduler
    schedule = s.SequentialLR(optimizer, [
        s.LinearLR(optimizer, 1 / (warmup + 1), 1.0, total_iters=warmup),
        s.CosineAnnealingLR(optimizer, max(opts.steps, warmup + 1) - warmup, eta_min=0.0)],
        milestones=[warmup])
    return model, optimizer, schedule


def torch_step(model, optimizer, schedule, x, y, clip: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    logits = model(torch.from_numpy(x))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    schedule.step()
    return loss.item()


@torch.no_grad()
def torch_held_out(model, batches: SequenceBatches) -> float:
    """The mean loss over every held-out position (as textrun.held_out_loss)."""
    total, count = 0.0, 0
    for x, y in batches.held_out_batches():
        logits = model(torch.from_numpy(x))
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                 torch.from_numpy(y).reshape(-1)).item() * x.size
        count += x.size
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of each side: NumPy's OpenBLAS and torch.set_num_threads "
                             "(gpuflow's own split threads stay at 1, the CLI's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu"],
                        help="gpuflow's device (torch runs on the CPU)")
    args = parser.parse_args()
    opts = TrainOptions(model="gpt", device=args.device, steps=args.steps,
                        eval_every=args.eval_every, threads=args.threads)
    opts.given = opts.explicit()
    textrun.take_defaults(opts)
    opts.check()
    set_threads(args.threads)  # NumPy's OpenBLAS and torch alike

    text_ids, vocabulary = load_text("python-docs")
    batches = SequenceBatches(text_ids, opts.context, opts.batch_size, seed=opts.seed,
                              held_out=textrun.HELD_OUT, drop_last=True)
    graph, loss, optimizer, schedule, arch = gpuflow_run(opts, len(vocabulary))
    model, t_opt, t_schedule = torch_run(opts, graph, len(vocabulary))
    print(f"{arch}; {opts.optimizer} lr {opts.lr:g}, warmup-cosine, clip {opts.clip:g}, "
          f"batch {opts.batch_size}, {opts.dtype}, {opts.steps} steps, {args.threads} "
          f"thread(s) each; gpuflow {opts.device}, torch {torch.__version__} eager cpu")
    print(f"{'step':>5}  {'gpuflow held-out':>16}  {'torch held-out':>14}  "
          f"{'gpuflow s':>9}  {'torch s':>7}   (held-out in nats/char; train time so far)")
    seconds = {"gpuflow": 0.0, "torch": 0.0}
    step = 0
    while step < opts.steps:
        for x, y in batches:  # a fresh order each epoch, as textrun's stream()
            clock = time.perf_counter()  # the cpu device's step is synchronous
            graph.step(x, y)
            clip_grad_norm(graph, opts.clip)
            optimizer.step()
            schedule.step()
            seconds["gpuflow"] += time.perf_counter() - clock
            clock = time.perf_counter()
            torch_step(model, t_opt, t_schedule, x, y, opts.clip)
            seconds["torch"] += time.perf_counter() - clock
            step += 1
            if step == 1:  # gpuflow plans the graph in its first step
                first = dict(seconds)
            if step % args.eval_every == 0 or step == opts.steps:
                print(f"{step:5d}  {textrun.held_out_loss(graph, loss, batches):16.4f}  "
                      f"{torch_held_out(model, batches):14.4f}  {seconds['gpuflow']:9.1f}  "
                      f"{seconds['torch']:7.1f}", flush=True)
            if step >= opts.steps:
                break
    print(f"total training time: gpuflow {seconds['gpuflow']:.1f} s "
          f"({1e3 * seconds['gpuflow'] / step:.1f} ms/step), torch {seconds['torch']:.1f} s "
          f"({1e3 * seconds['torch'] / step:.1f} ms/step); the first step: gpuflow "
          f"{first['gpuflow']:.1f} s, torch {first['torch']:.2f} s")


if __name__ == "__main__":
    main()
