"""Weights exchanged with PyTorch through safetensors: gpuflow -> torch.nn.Sequential and back,
the same predictions (float32, relative 1e-6); names by Sequential position or an explicit
mapping; a file that does not fit is one CheckpointError listing what differs, nothing changed."""

from __future__ import annotations

import ast
from collections import OrderedDict

import numpy as np
import pytest
import safetensors

import gpuflow as gf
from gpuflow.checkpoint import export_weights, load_weights, save
from gpuflow.data import load_digits
from gpuflow.errors import CheckpointError
from gpuflow.optim import Adam

from test_checkpoint import Centre, host_params

torch = pytest.importorskip("torch", reason="the interchange tests need PyTorch")
from safetensors.torch import load_file, save_file  # noqa: E402

SIZES = [64, 32, 16, 10]


def gf_model(device="cpu", seed=0, dtype="float32"):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, SIZES, seed=seed)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype=dtype,
                     inputs=[X, y], outputs=[logits])
    return graph, logits


def torch_model(seed=0, names=None):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.ReLU(),
              torch.nn.Linear(SIZES[1], SIZES[2]), torch.nn.ReLU(),
              torch.nn.Linear(SIZES[2], SIZES[3])]
    if names:
        return torch.nn.Sequential(OrderedDict(zip(names, layers)))
    return torch.nn.Sequential(*layers)


def digits(n=200):
    X, y = load_digits()
    return X[:n].astype(np.float32), y[:n]


def assert_same_predictions(ours, theirs, what):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    scale = np.max(np.abs(theirs))
    err = np.max(np.abs(ours - theirs)) / scale
    print(f"{what}: max |gpuflow - torch| / max |torch| = {err:.2e} over {theirs.shape} logits; "
          f"argmax agree {np.mean(ours.argmax(1) == theirs.argmax(1)):.3f}")
    assert err < 1e-6, f"{what}: relative difference {err:.2e}"


def test_train_in_gpuflow_predict_in_torch(tmp_path):
    X, y = digits()
    graph, logits = gf_model()
    opt = Adam(graph, lr=1e-2)
    for _ in range(20):
        graph.step(X, y)
        opt.step()
    path = tmp_path / "mlp.safetensors"
    export_weights(graph, path)
    tensors = load_file(path)
    assert sorted(tensors) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    assert tensors["0.weight"].shape == (32, 64) and tensors["0.weight"].dtype == torch.float32
    model = torch_model(seed=1)
    model.load_state_dict(tensors)  # strict: every name and shape of the module
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    ours = gf.to_numpy(graph.run(logits, X)) if hasattr(gf, "to_numpy") else \
        np.asarray(graph.device.to_host(graph.run(logits, X)))
    assert_same_predictions(ours, theirs, "gpuflow -> torch")
    assert np.mean(ours.argmax(1) == y) > 0.8  # it did train


def test_train_in_torch_predict_in_gpuflow(device, tmp_path):
    X, y = digits()
    model = torch_model(seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
    path = tmp_path / "torch.safetensors"
    save_file(model.state_dict(), path)
    graph, logits = gf_model(device, seed=3)
    load_weights(graph, path)
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    ours = np.asarray(graph.device.to_host(graph.run(logits, X)))
    assert_same_predictions(ours, theirs, f"torch -> gpuflow on {device.name}")
    for p in graph.parameters:
        assert device.owns(p.value) and p.value.dtype == graph.dtype, p.label


def test_the_round_trip_test_can_fail(tmp_path):
    """Without the transposition (layout='gpuflow') torch refuses the shapes; with other
    weights the predictions differ: the tests above are not vacuous."""
    graph, _ = gf_model()
    export_weights(graph, tmp_path / "gf.safetensors", layout="gpuflow")
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):
        torch_model().load_state_dict(load_file(tmp_path / "gf.safetensors"))
    save_file(torch_model(seed=5).state_dict(), tmp_path / "t.safetensors")
    load_weights(graph, tmp_path / "t.safetensors")
    X, _ = digits(20)
    with torch.no_grad():
        theirs = torch_model(seed=6)(torch.from_numpy(X)).numpy()
    ours = np.asarray(graph.run(graph.loss.inbound_nodes[1], X))
    with pytest.raises(AssertionError):
        assert_same_predictions(ours, theirs, "different weights")


def test_named_torch_layers_need_a_mapping(tmp_path):
    model = torch_model(seed=4, names=["fc1", "act1", "fc2", "act2", "fc3"])
    save_file(model.state_dict(), tmp_path / "named.safetensors")
    graph, logits = gf_model()
    before = host_params(graph)
    with pytest.raises(CheckpointError) as info:
        load_weights(graph, tmp_path / "named.safetensors")
    message = str(info.value)
    assert "parameter 'layer1.W' (shape (64, 32)) has no tensor '0.weight' in the file" in message
    assert "tensors in the file that nothing took: fc1.bias (32,), fc1.weight (32, 64)" in message
    assert all(np.array_equal(v, before[k]) for k, v in host_params(graph).items())
    mapping = {f"layer{i}.{p}": f"fc{i}.{t}" for i in (1, 2, 3)
               for p, t in (("W", "weight"), ("b", "bias"))}
    help_line = message.splitlines()[-1]  # the error suggests the pairing by order and shape
    assert help_line.startswith("help: if this pairing by order and shape is right, pass "
                                "mapping={"), help_line
    assert ast.literal_eval(help_line[help_line.index("{"):-1]) == mapping
    load_weights(graph, tmp_path / "named.safetensors", mapping=mapping)
    X, _ = digits(50)
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    assert_same_predictions(np.asarray(graph.run(logits, X)), theirs, "mapped names")


def test_no_mapping_is_suggested_when_shapes_do_not_pair(tmp_path):
    model = torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(64, 16), act=torch.nn.ReLU(),
                                            fc2=torch.nn.Linear(16, 32), act2=torch.nn.ReLU(),
                                            fc3=torch.nn.Linear(32, 10)))
    save_file(model.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_weights(gf_model()[0], tmp_path / "other.safetensors")
    assert "help: pass mapping={gpuflow name: tensor name} for the names that differ" in \
        str(info.value)


def test_shapes_that_differ_are_listed_and_nothing_changes(tmp_path):
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(64, 30), torch.nn.ReLU(),
                                torch.nn.Linear(30, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10))
    state = other.state_dict()
    state["5.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "other.safetensors")
    graph, _ = gf_model()
    before = {p.name: p.value for p in graph.parameters}
    with pytest.raises(CheckpointError) as info:
        load_weights(graph, tmp_path / "other.safetensors")
    message = str(info.value)
    assert str(tmp_path / "other.safetensors") in message
    assert ("parameter 'layer1.W': expected shape (64, 32) (this model), actual (64, 30) "
            "(tensor '0.weight', transposed)") in message
    assert "parameter 'layer1.b': expected shape (32,) (this model), actual (30,)" in message
    assert "tensors in the file that nothing took: 5.weight (3,)" in message
    assert all(p.value is before[p.name] for p in graph.parameters)
    del state["5.weight"]
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="layer2.W': expected shape \\(32, 16\\)"):
        load_weights(graph, tmp_path / "other.safetensors", strict=False)


def test_bad_mapping_layout_and_dtype(tmp_path):
    graph, _ = gf_model()
    save_file(torch_model().state_dict(), tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError, match="mapping names \\['nope'\\], which this model "
                                              "does not have"):
        load_weights(graph, tmp_path / "t.safetensors", mapping={"nope": "0.weight"})
    with pytest.raises(CheckpointError, match="layout='keras'; expected one of"):
        load_weights(graph, tmp_path / "t.safetensors", layout="keras")
    save_file({k: v.to(torch.bfloat16) for k, v in torch_model().state_dict().items()},
              tmp_path / "bf16.safetensors")
    with pytest.raises(CheckpointError, match="dtypes NumPy cannot hold: .*BF16.*\n"
                                              "help: save them as float32"):
        load_weights(graph, tmp_path / "bf16.safetensors")
    save_file({k: v.to(torch.int32) for k, v in torch_model().state_dict().items()},
              tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match="tensor '0.bias' has dtype int32, not a floating"):
        load_weights(graph, tmp_path / "int.safetensors")


def test_gpuflow_layout_and_checkpoints_load_by_name(device, tmp_path):
    src, logits = gf_model(dtype="float64")
    export_weights(src, tmp_path / "w.safetensors", layout="gpuflow")
    with safetensors.safe_open(tmp_path / "w.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == sorted(p.name for p in src.parameters)
    save(tmp_path / "c.safetensors", src, Adam(src))
    for name in ("w.safetensors", "c.safetensors"):
        graph, _ = gf_model(device, seed=7)
        load_weights(graph, tmp_path / name, layout="gpuflow")
        got = {k: np.asarray(device.to_host(v)) for k, v in
               ((p.name, p.value) for p in graph.parameters)}
        for k, v in host_params(src).items():
            np.testing.assert_array_equal(got[k], v.astype(np.float32), err_msg=f"{name} {k}")


def test_node_state_is_exchanged_under_its_module_index(tmp_path):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    hidden, _ = gf.mlp(X, [64, 8], seed=0, name="enc")
    centre = Centre(hidden, 8, name="centre")
    logits, _ = gf.mlp(centre, [8, 10], seed=1, name="head")
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", dtype="float64",
                     inputs=[X, y])
    graph.step(*digits(16))
    export_weights(graph, tmp_path / "w.safetensors")
    tensors = load_file(tmp_path / "w.safetensors")
    assert sorted(tensors) == ["0.bias", "0.weight", "1.count", "1.mean", "2.bias", "2.weight"]
    tensors["1.mean"] = tensors["1.mean"] + 1
    save_file(tensors, tmp_path / "edited.safetensors")
    expected = np.array(centre.mean) + 1
    load_weights(graph, tmp_path / "edited.safetensors")
    assert np.array_equal(centre.mean, expected) and centre.count == 1


def test_readme_checkpoint_snippet_runs(tmp_path, monkeypatch):
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    training = next(b for b in blocks if "graph.step(xb, yb)" in b)
    snippet = next(b for b in blocks if "export_weights" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(training.replace("range(25)", "range(1)").replace('"auto"', '"cpu"'), namespace)
    exec(snippet, namespace)
    assert namespace["info"]["epoch"] == 25
    assert sorted(load_file(tmp_path / "mlp.safetensors"))[:2] == ["0.bias", "0.weight"]


def cnn(device="cpu", seed=0):
    """Conv2D, BatchNorm, ReLU, MaxPool2D, Flatten, Linear: an equal Sequential's indices 0-5."""
    x, y = gf.Input(name="x"), gf.Input(name="y")
    h, _ = gf.layers.conv2d(x, 1, 4, 3, padding=1, name="conv", rng=seed)
    h, _ = gf.layers.batchnorm(h, 4, name="bn")
    h = gf.MaxPool2D(gf.ReLU(h), 2)
    logits, _ = gf.layers.dense(gf.Flatten(h), 4 * 4 * 4, 10, name="fc", rng=seed + 1)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float32",
                     inputs=[x, y], outputs=[logits])
    return graph, logits


def torch_cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 10))


def images(n=64):
    X, y = digits(n)
    return X.reshape(-1, 1, 8, 8), y


def test_cnn_with_batchnorm_both_ways(device, tmp_path):
    """Conv weights as they are, BatchNorm's affine parameters and running statistics (in
    evaluation mode), and PyTorch's num_batches_tracked written as 0 and ignored on load."""
    X, y = images()
    graph, logits = cnn()
    opt = Adam(graph, lr=1e-2)
    for _ in range(5):  # training mode: the running statistics move
        graph.step(X, y)
        opt.step()
    export_weights(graph, tmp_path / "cnn.safetensors")
    model = torch_cnn(seed=1)
    model.load_state_dict(load_file(tmp_path / "cnn.safetensors"))  # strict
    assert float(model[1].running_var.sum()) != 4.0  # not the initial statistics
    model.eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    assert_same_predictions(np.asarray(graph.run(logits, X)), theirs, "gpuflow cnn -> torch")

    model = torch_cnn(seed=2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(X))  # the running statistics move
    model.eval()
    save_file(model.state_dict(), tmp_path / "torch-cnn.safetensors")
    other, other_logits = cnn(device, seed=3)
    load_weights(other, tmp_path / "torch-cnn.safetensors")
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    ours = np.asarray(other.device.to_host(other.run(other_logits, X)))
    assert_same_predictions(ours, theirs, f"torch cnn -> gpuflow on {device.name}")


def torch_lenet(batch_norm, dropout, hidden=64, seed=0):
    """The torch.nn.Sequential equal to gf.layers.lenet(x, (1, 8, 8), 10, ...)."""
    torch.manual_seed(seed)
    layers, c, side = [], 1, 8
    for width in (16, 32):
        layers.append(torch.nn.Conv2d(c, width, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(torch.nn.BatchNorm2d(width))
        layers += [torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        c, side = width, side // 2
    layers += [torch.nn.Flatten(), torch.nn.Linear(c * side * side, hidden), torch.nn.ReLU(),
               torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 10)]
    return torch.nn.Sequential(*layers)


def gf_lenet(batch_norm, device="cpu", seed=0):
    """gf.layers.lenet with dropout 0.25; with BatchNorm, the model of `gpuflow train --model
    cnn`, built by the CLI's own build_model."""
    if batch_norm:
        from gpuflow.cli import TrainOptions, build_model
        opts = TrainOptions(model="cnn", hidden=(64,), seed=seed)
        opts.check()
        X, y, logits, loss, _ = build_model(opts, (1, 8, 8), 10)
    else:
        X, y = gf.Input(name="X"), gf.Input(name="y")
        logits, _ = gf.layers.lenet(X, (1, 8, 8), 10, hidden=64, dropout=0.25, seed=seed)
        loss = gf.SoftmaxCrossEntropy(y, logits)
    graph = gf.Graph(loss, device=device, dtype="float32", inputs=[X, y], outputs=[logits])
    assert any(isinstance(n, gf.Dropout) for n in graph.nodes)
    return graph, logits


@pytest.mark.parametrize("batch_norm", [False, True], ids=["lenet", "cli-cnn"])
def test_cnn_with_dropout_both_ways(device, tmp_path, batch_norm):
    """Issue 18 item 4: Dropout's step counter is checkpoint state, not a weight: a file from
    export_weights loads into the equal torch module with strict load_state_dict, and a torch
    state_dict loads strictly into the gpuflow model, with and without BatchNorm."""
    X, y = images()
    graph, logits = gf_lenet(batch_norm)
    opt = Adam(graph, lr=1e-2)
    for _ in range(3):  # the dropout masks are drawn: its step counter moves
        graph.step(X, y)
        opt.step()
    export_weights(graph, tmp_path / "cnn.safetensors")
    tensors = load_file(tmp_path / "cnn.safetensors")
    assert not any(k.endswith(".steps") for k in tensors), sorted(tensors)
    save(tmp_path / "run.safetensors", graph, opt)  # a checkpoint keeps it, for the resume
    assert int(load_file(tmp_path / "run.safetensors")["node/cnn.dropout/steps"]) == 3
    again, again_logits = gf_lenet(batch_norm, seed=4)  # and load_weights takes its weights
    load_weights(again, tmp_path / "run.safetensors")
    np.testing.assert_array_equal(np.asarray(again.run(again_logits, X)),
                                  np.asarray(graph.run(logits, X)))
    model = torch_lenet(batch_norm, 0.25, seed=1)
    model.load_state_dict(tensors)  # strict
    model.eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    assert_same_predictions(np.asarray(graph.run(logits, X)), theirs, "gpuflow lenet -> torch")

    model = torch_lenet(batch_norm, 0.25, seed=2)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(X))  # BatchNorm's running statistics move
    model.eval()
    save_file(model.state_dict(), tmp_path / "torch.safetensors")
    other, other_logits = gf_lenet(batch_norm, device, seed=3)
    dropout = next(n for n in other.nodes if isinstance(n, gf.Dropout))
    dropout.steps = 5
    load_weights(other, tmp_path / "torch.safetensors")  # strict
    assert dropout.steps == 5  # its own state, which no weight file holds, is left as it was
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    ours = np.asarray(other.device.to_host(other.run(other_logits, X)))
    assert_same_predictions(ours, theirs, f"torch lenet -> gpuflow on {device.name}")


def test_named_torch_cnn_is_paired_by_layer_structure(tmp_path):
    """Issue 18 item 22: a module whose children are named conv1, bn1, fc1 (a safetensors file
    keeps no module order: its tensors are sorted by dtype and name, bn1 before conv1) is
    paired layer by layer by what each layer holds (roles and shapes), in the graph's order;
    the suggested mapping loads strictly, BatchNorm's num_batches_tracked included."""
    torch.manual_seed(8)
    model = torch.nn.Sequential(OrderedDict(
        conv1=torch.nn.Conv2d(1, 4, 3, padding=1), bn1=torch.nn.BatchNorm2d(4),
        relu1=torch.nn.ReLU(), pool1=torch.nn.MaxPool2d(2), flat=torch.nn.Flatten(),
        fc1=torch.nn.Linear(4 * 4 * 4, 10)))
    X, _ = images()
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(X))  # the running statistics move
    model.eval()
    save_file(model.state_dict(), tmp_path / "named.safetensors")
    graph, logits = cnn()
    with pytest.raises(CheckpointError) as info:
        load_weights(graph, tmp_path / "named.safetensors")
    help_line = str(info.value).splitlines()[-1]
    assert help_line.startswith("help: if this pairing by order and shape is right, pass "
                                "mapping={"), help_line
    mapping = ast.literal_eval(help_line[help_line.index("{"):-1])
    assert mapping == {"conv.W": "conv1.weight", "conv.b": "conv1.bias",
                       "bn.gamma": "bn1.weight", "bn.beta": "bn1.bias",
                       "bn/running_mean": "bn1.running_mean",
                       "bn/running_var": "bn1.running_var",
                       "fc.W": "fc1.weight", "fc.b": "fc1.bias"}
    load_weights(graph, tmp_path / "named.safetensors", mapping=mapping)  # strict
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    assert_same_predictions(np.asarray(graph.run(logits, X)), theirs, "named torch cnn")
    export_weights(graph, tmp_path / "back.safetensors", mapping=mapping)  # and back
    torch_cnn_named = type(model)(OrderedDict(model.named_children()))
    torch_cnn_named.load_state_dict(load_file(tmp_path / "back.safetensors"))  # strict


def test_layers_alike_pair_in_natural_order(tmp_path):
    """Layers that hold the same shapes pair in the file names' natural order (fc2 before
    fc10), the graph's layers in the graph's order."""
    X = gf.Input(name="X")
    out, _ = gf.mlp(X, [8, 8, 8, 8], seed=0)
    graph = gf.Graph(out, device="cpu", dtype="float32", inputs=[X])
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict(
        (name, torch.nn.Linear(8, 8)) for name in ("fc2", "fc10", "fc11")))
    save_file(model.state_dict(), tmp_path / "alike.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_weights(graph, tmp_path / "alike.safetensors")
    help_line = str(info.value).splitlines()[-1]
    mapping = ast.literal_eval(help_line[help_line.index("{"):-1])
    assert [mapping[f"layer{i}.W"] for i in (1, 2, 3)] == ["fc2.weight", "fc10.weight",
                                                          "fc11.weight"]


def test_a_torch_pickle_is_refused_as_such(tmp_path):
    """A torch.save file (a zip holding a pickle) is never unpickled: one error saying what
    it is and how to save safetensors instead, not 'damaged'."""
    torch.save(torch_cnn().state_dict(), tmp_path / "model.pt")
    graph, _ = cnn()
    with pytest.raises(CheckpointError, match="PyTorch pickle .*torch.save.*never unpickles"
                                              "(.|\n)*save_file\\(model.state_dict\\(\\)"):
        load_weights(graph, tmp_path / "model.pt")
