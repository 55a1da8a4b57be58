"""The GPT (gf.layers.gpt, gf.transformer_block) and an LSTM language model trained in float64
AdamW against the equal PyTorch modules from the same weights on the same batches: the first 20
losses equal to rel 1e-9; the GPT's weights exchanged with the torch module both ways
(export_weights / load_weights); the GPT's bad sizes."""

from __future__ import annotations

import numpy as np
import pytest

import gpuflow as gf
from conftest import host
from gpuflow.checkpoint import export_weights, load_weights

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn

VOCAB, CONTEXT, DIM, LAYERS, HEADS, BATCH = 19, 8, 16, 2, 2, 3
TRAIN_DEVICES = ["cpu", "torch:cpu", "jax:cpu"]


class TorchBlock(nn.Module):
    """The pre-LayerNorm GPT-2 block, as gf.transformer_block (exact GELU)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        T = x.shape[1]
        blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=blocked, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    """The torch module equal to gf.layers.gpt: its state_dict keys are the gpuflow names
    without "gpt." (the README's table)."""

    def __init__(self, vocab, context, dim, layers, heads):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(TorchBlock(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class TorchLSTMModel(nn.Module):
    def __init__(self, vocab, dim, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.lstm(self.embed(ids))[0])


def _batches(steps=20, seed=0):
    """`steps` batches cycling through 4 (so that the loss can fall)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(min(steps, 4)):
        x = rng.integers(0, VOCAB, (BATCH, CONTEXT))
        y = np.concatenate([x[:, 1:], rng.integers(0, VOCAB, (BATCH, 1))], axis=1)
        y[0, :2] = -100  # a few ignored positions
        out.append((x, y))
    return [out[i % len(out)] for i in range(steps)]


def _gpt_graph(device, **options):
    ids, y = gf.Input(name="ids"), gf.Input(name="y")
    logits, params = gf.layers.gpt(ids, VOCAB, CONTEXT, DIM, LAYERS, HEADS, rng=7, **options)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                     inputs=[ids, y])
    return graph, logits, params


def _torch_losses(model, batches, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        logits = model(torch.tensor(x))
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(y).reshape(-1),
                                           ignore_index=-100)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _gf_losses(graph, batches, lr=3e-3):
    opt = gf.optim.AdamW(graph, lr)  # torch's defaults: betas, eps, weight_decay 0.01
    losses = []
    for x, y in batches:
        losses.append(graph.item(graph.step(x, y)))
        opt.step()
    return losses


@pytest.mark.parametrize("spec", TRAIN_DEVICES)
def test_gpt_trains_as_the_torch_module(spec, tmp_path):
    device = _device(spec)
    graph, _, _ = _gpt_graph(device)
    path = tmp_path / "gpt.safetensors"
    export_weights(graph, path)  # gpuflow -> torch: the module's own names and layouts
    model = TorchGPT(VOCAB, CONTEXT, DIM, LAYERS, HEADS).double()
    model.load_state_dict(safetensors_torch.load_file(path))  # strict: every key and shape
    batches = _batches()
    expected = _torch_losses(model, batches)
    got = _gf_losses(graph, batches)
    np.testing.assert_allclose(got, expected, rtol=1e-9, err_msg=f"GPT on {device.name}")
    assert expected[-4] < expected[0] - 0.1  # it did train (the same batch)
    # and the trained weights go back to torch equal
    export_weights(graph, path)
    trained = safetensors_torch.load_file(path)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(trained[key].numpy(), value.numpy(), rtol=1e-7, atol=1e-10,
                                   err_msg=key)


def test_gpt_loads_a_torch_modules_weights(tmp_path):
    torch.manual_seed(0)
    model = TorchGPT(VOCAB, CONTEXT, DIM, LAYERS, HEADS).double()
    path = tmp_path / "torch.safetensors"
    safetensors_torch.save_file(model.state_dict(), path)
    graph, logits, _ = _gpt_graph("cpu")
    load_weights(graph, path)  # strict: every tensor of the file taken
    x = _batches(1)[0][0][:, :5]  # a shorter sequence than the context
    with torch.no_grad():
        expected = model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(host(graph.device, graph.run(logits, x)), expected, rtol=1e-9,
                               atol=1e-12)


def _device(spec):
    try:
        return gf.get_device(spec)
    except gf.DeviceError as exc:
        pytest.skip(f"{spec} unavailable: {str(exc).splitlines()[0]}")


@pytest.mark.parametrize("spec", TRAIN_DEVICES)
def test_lstm_model_trains_as_torch_lstm(spec):
    device = _device(spec)
    ids, y = gf.Input(name="ids"), gf.Input(name="y")
    h, params = gf.embedding(ids, VOCAB, 6, name="embed", rng=1)
    h, p = gf.lstm(h, 6, 10, name="lstm", rng=2)
    params.update(p)
    logits, p = gf.dense(h, 10, VOCAB, name="head", rng=3)
    params.update(p)
    state = {k: torch.tensor(v.value) for k, v in params.items()}  # host arrays until bound
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                     inputs=[ids, y])
    model = TorchLSTMModel(VOCAB, 6, 10).double()
    state["head.weight"], state["head.bias"] = state.pop("head.W").T, state.pop("head.b")
    model.load_state_dict(state)
    batches = _batches()
    expected = _torch_losses(model, batches, lr=1e-2)
    got = _gf_losses(graph, batches, lr=1e-2)
    np.testing.assert_allclose(got, expected, rtol=1e-9, err_msg=f"LSTM on {device.name}")
    assert expected[-4] < expected[0] - 0.1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_gpt_step_allocates_no_array_after_warmup(optimizer):
    # As tests/test_buffers.py's MLP and CNN steps: a float32 GPT at batch 32, T 64, width 128
    # (every activation >= 1 MiB, the attention's (N, H, T, T) 2 MiB) on 'cpu'. T is shorter
    # than the position table, so that Positions' gradient has zero rows too.
    import tracemalloc
    rng = np.random.default_rng(0)
    ids, y = gf.Input(name="ids"), gf.Input(name="y")
    logits, _ = gf.layers.gpt(ids, 65, 72, 128, 2, 4, rng=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", dtype="float32",
                     inputs=[ids, y])
    opt = gf.optim.make_optimizer(optimizer, graph, 1e-3)
    xb, yb = rng.integers(0, 65, (32, 64)), rng.integers(0, 65, (32, 64))

    def step():
        graph.step(xb, yb)
        opt.step()

    for _ in range(3):
        step()
    tracemalloc.start()
    try:
        step()  # traced too, so that the views it makes and the next step frees are counted
        before = tracemalloc.take_snapshot()
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        step()
        _, peak = tracemalloc.get_traced_memory()
        grown = [d for d in tracemalloc.take_snapshot().compare_to(before, "lineno")
                 if d.size_diff >= 2048]
    finally:
        tracemalloc.stop()
    # NumPy's own per-call iterator buffers (8192 items of each operand), freed inside the
    # call: the largest, ~140 KB, where SoftmaxCrossEntropy compares the integer labels into
    # its float one-hot. Before the kept buffers, a step peaked at ~88 MB.
    assert peak - start < 256 * 1024, f"a step allocated {peak - start} bytes at its peak"
    # What a step keeps: only the small views it makes of kept arrays (replacing the last
    # step's); no allocation site keeps 2 KiB more.
    assert not grown, f"a step kept arrays: {grown}"


def test_a_context_longer_than_the_position_table(device):
    ids = gf.Input(name="ids")
    logits, _ = gf.layers.gpt(ids, VOCAB, 4, DIM, 1, HEADS, rng=0)
    graph = gf.Graph(logits, device=device, dtype="float64", inputs=[ids])
    graph.run(logits, np.zeros((2, 4), dtype=np.int64))  # the whole context: fine
    with pytest.raises(gf.GraphError) as info:
        graph.run(logits, np.zeros((2, 5), dtype=np.int64))
    msg = str(info.value)
    for part in ("Positions 'gpt.pos_emb'", "(2, 5) (5 positions)", "shape (4, 16)",
                 "room for 4 positions", "help:", "longer context"):
        assert part in msg, msg


def test_a_head_count_that_does_not_divide_the_width_leaves_ids_alone():
    ids = gf.Input(name="ids")
    for build in (lambda: gf.layers.gpt(ids, VOCAB, CONTEXT, 10, 2, 3, rng=0),
                  lambda: gf.transformer_block(ids, 10, 4, name="block")):
        with pytest.raises(gf.GraphError) as info:
            build()
        assert "heads do not divide the width dim=10" in str(info.value)
        assert "help: use a head count that divides 10 (1, 2, 5, 10)" in str(info.value)
        assert ids.outbound_nodes == []


def test_bad_gpt_sizes():
    ids = gf.Input(name="ids")
    for kwargs, part in [({"vocab": 0}, "vocab must be an integer >= 1"),
                         ({"layers": 1.5}, "layers must be an integer >= 1"),
                         ({"dropout": 1.0}, "dropout=1.0 must be a number in [0, 1)")]:
        sizes = {"vocab": VOCAB, "context": CONTEXT, "dim": DIM, "layers": 1, "heads": HEADS}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k == "dropout"}
        sizes.update(kwargs)
        with pytest.raises(gf.GraphError) as info:
            gf.layers.gpt(ids, **sizes, **options, rng=0)
        assert part in str(info.value) and "help:" in str(info.value), str(info.value)
        assert ids.outbound_nodes == []


def test_generate_continues_a_prompt_as_the_torch_module(device, tmp_path):
    graph, logits, _ = _gpt_graph(device)
    path = tmp_path / "gpt.safetensors"
    export_weights(graph, path)
    model = TorchGPT(VOCAB, CONTEXT, DIM, LAYERS, HEADS).double()
    model.load_state_dict(safetensors_torch.load_file(path))
    prompt = np.array([3, 1, 4, 1, 5])
    greedy = gf.generate(graph, logits, prompt, 6, temperature=0)  # crosses the context (8)
    ids = torch.tensor(prompt)[None]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids[:, -CONTEXT:])[:, -1].argmax(-1, keepdim=True)], 1)
    np.testing.assert_array_equal(greedy, ids[0].numpy())
    assert greedy.shape == (11,) and greedy.dtype == np.int64
    np.testing.assert_array_equal(gf.generate(graph, logits, prompt, 6, top_k=1, seed=5), greedy)
    # sampling: one seed, one text; the prompt kept; (N, T) prompts row by row
    first = gf.generate(graph, logits, prompt[None].repeat(2, 0), 12, temperature=1.5, seed=1)
    again = gf.generate(graph, logits, prompt[None].repeat(2, 0), 12, temperature=1.5, seed=1)
    other = gf.generate(graph, logits, prompt[None].repeat(2, 0), 12, temperature=1.5, seed=2)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (2, 17) and (first[:, :5] == prompt).all()
    assert not np.array_equal(first, other) and not np.array_equal(first[0], first[1])
    assert first.min() >= 0 and first.max() < VOCAB
    top2 = gf.generate(graph, logits, prompt, 30, top_k=2, temperature=3.0, seed=0)
    assert len(set(top2[5:].tolist())) > 1


def test_generate_refuses_bad_arguments():
    graph, logits, _ = _gpt_graph("cpu")
    for kwargs, part in [({"prompt": np.array([0.5])}, "expected integer ids"),
                         ({"temperature": -1.0}, "temperature=-1.0 must be a finite number"),
                         ({"top_k": 0}, "top_k must be an integer >= 1"),
                         ({"n": -1}, "n must be an integer >= 0")]:
        args = {"prompt": np.array([1, 2]), "n": 2, **kwargs}
        with pytest.raises(gf.GraphError) as info:
            gf.generate(graph, logits, args.pop("prompt"), args.pop("n"), **args)
        assert part in str(info.value) and "help:" in str(info.value), str(info.value)
