"""The bad-input catalogue (docs/errors.md), one test per row: each checks the exception type
and the message (the node, file or argument named, the values involved, and a 'help:' fix).

Rows already tested elsewhere are extended here, not repeated: test_graph.py has the base
cases of Linear/MSE shape errors, feeds of None, mixed float dtypes, foreign arrays, a node on
two devices and bad learning rates for sgd_update; test_checkpoint.py and test_data.py have
the file errors; test_cli.py the command-line ones.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpuflow as gf
from conftest import host
from gpuflow.cli import main
from gpuflow.optim import SGD, Adam, AdamW, make_optimizer


def expect(exc_type, fn, *parts):
    """Call fn; it must raise exc_type with every one of `parts` (and 'help:') in the message."""
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    for part in (*parts, "help:"):
        assert part in msg, f"{part!r} missing from: {msg}"
    return msg


def linear(device="cpu", dtype=None, x=None, w=None, b=None):
    X, W, B = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    node = gf.Linear(X, W, B, name="hidden")
    feed = {X: np.ones((2, 3)) if x is None else x, W: np.ones((3, 4)) if w is None else w,
            B: np.zeros(4) if b is None else b}
    return node, (X, W, B), gf.topological_sort(feed, device=device, dtype=dtype)


def classifier(device="cpu", dtype="float64", labels=(0, 1, 2), logits=None):
    """labels -> SoftmaxCrossEntropy('loss') <- logits, built with topological_sort."""
    y, Z = gf.Input(name="y"), gf.Input(name="Z")
    loss = gf.SoftmaxCrossEntropy(y, Z, name="loss")
    z = np.zeros((len(labels), 3)) if logits is None else logits
    graph = gf.topological_sort({y: np.asarray(labels), Z: z}, device=device, dtype=dtype)
    return loss, (y, Z), graph


def small_graph(device="cpu", dtype="float32"):
    """An mlp classifier as a Graph, inputs [X, y]."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [3, 4, 3], seed=0)
    loss = gf.SoftmaxCrossEntropy(y, logits, name="loss")
    return gf.Graph(loss, device=device, dtype=dtype, inputs=[X, y]), params


# -- wrong shapes at every node -----------------------------------------------------------------
def test_linear_wrong_width_on_a_later_batch(device):
    graph, _ = small_graph(device)
    graph.step(np.ones((2, 3)), np.array([0, 1]))
    expect(gf.GraphError, lambda: graph.step(np.ones((2, 5)), np.array([0, 1])),
           "Linear 'layer1'", "(2, 5)", "(3, 4)", "X.shape[-1] == W.shape[0]",
           "Parameter 'layer1.W'")


def test_linear_bias_of_the_wrong_size(device):
    node, _, graph = linear(device, b=np.zeros(5))
    expect(gf.GraphError, lambda: gf.forward_pass(node, graph),
           "Linear 'hidden'", "b has shape (5,)", "(3, 4)", "must have shape (4,)", "Input 'b'")


def test_linear_bias_with_a_batch_axis_is_refused(device):
    # (batch, n_out) would broadcast in forward and break backward: refused at forward
    node, _, graph = linear(device, b=np.zeros((2, 4)))
    expect(gf.GraphError, lambda: gf.forward_pass(node, graph), "b has shape (2, 4)")


def test_mse_lengths_differ_after_a_later_feed(device):
    y, a = gf.Input(name="y"), gf.Input(name="a")
    cost = gf.MSE(y, a, name="cost")
    graph = gf.topological_sort({y: np.ones(4), a: np.ones((4, 1))}, device=device)
    gf.forward_pass(cost, graph)
    a.value = np.ones((3, 1))
    expect(gf.GraphError, lambda: gf.forward_pass(cost, graph),
           "MSE 'cost'", "(4,) (4 values)", "(3, 1) (3 values)", "Input 'y'", "Input 'a'")


@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_out_of_range_on_the_first_step(device, bad):
    def first_step():
        _, _, graph = classifier(device, labels=(0, bad, 1))
        gf.forward_and_backward(graph)

    # a negative label is refused when fed (the class count is not known yet), one too large
    # at the first forward, which knows the logits' width
    msg = expect(gf.GraphError, first_step, f"from {min(0, bad)} to {max(1, bad)}",
                 ">= 0" if bad < 0 else "3 classes (0 .. 2)", "number of outputs")
    assert ("Input 'y'" if bad < 0 else "SoftmaxCrossEntropy 'loss'") in msg, msg


@pytest.mark.parametrize("bad", [-1, 3])
@pytest.mark.parametrize("how", ["value", "step"])
def test_labels_out_of_range_on_a_later_feed(device, bad, how):
    # once the first step has run, a host batch of labels is checked when it is fed
    if how == "value":
        loss, (y, _), graph = classifier(device)
        gf.forward_and_backward(graph)
        feed = lambda: setattr(y, "value", np.array([0, bad, 1]))  # noqa: E731
    else:
        g, _ = small_graph(device)
        g.step(np.ones((3, 3)), np.array([0, 1, 2]))
        feed = lambda: g.step(np.ones((3, 3)), np.array([0, bad, 1]))  # noqa: E731
    expect(gf.GraphError, feed, "Input 'y'", f"from {min(0, bad)} to {max(1, bad)}", "0 .. 2")


def test_labels_out_of_range_later_on_the_cpu_are_not_silently_used():
    # regression: NumPy labels on the CPU graph used to skip the check (the loss became -0.0)
    g, _ = small_graph("cpu")
    g.step(np.ones((2, 3)), np.array([0, 1]))
    for labels in (np.array([-1, 0]), np.array([0, 7], dtype=np.uint8)):
        expect(gf.GraphError, lambda: g.step(np.ones((2, 3)), labels), "Input 'y'", "0 .. 2")


def test_a_node_sets_its_integer_inputs_check_through_expect_classes():
    # Input.expect_classes is how a node reading integers (SoftmaxCrossEntropy, Embedding)
    # sets an Input's feed-time check; an argument left out keeps its setting (issue #19)
    loss, (y, _), graph = classifier("cpu")
    gf.forward_and_backward(graph)  # the loss set 3 classes and its ignore_index, -100
    y.expect_classes(words=("targets", "target classes", "check the targets"))
    y.value = np.array([0, -100, 2])  # still 3 classes, -100 still allowed
    expect(gf.GraphError, lambda: setattr(y, "value", np.array([0, 3])),
           "targets range from 0 to 3", "0 .. 2 (or -100, the ignore_index)", "check the targets")
    y.expect_classes(2)
    expect(gf.GraphError, lambda: setattr(y, "value", np.array([0, 2])),
           "targets range from 0 to 2", "0 .. 1 (or -100")


@pytest.mark.parametrize("when", ["first", "later"])
def test_non_integer_float_labels(device, when):
    bad = np.array([0.0, 1.5, 2.0])
    if when == "first":
        def fn():
            _, _, graph = classifier(device, labels=bad)
            gf.forward_and_backward(graph)
    else:
        _, (y, _), graph = classifier(device)
        gf.forward_and_backward(graph)

        def fn():
            y.value = bad
            gf.forward_and_backward(graph)
    expect(gf.GraphError, fn, "labels have dtype float64", "integer class indices",
           "astype('int64')")


def test_boolean_labels_are_refused(device):
    expect(gf.GraphError, lambda: classifier(device, labels=np.array([True, False, True])),
           "Input 'y'", "dtype bool", "integer class indices")


def test_labels_of_the_wrong_batch_size(device):
    loss, (y, _), graph = classifier(device, labels=(0, 1, 2, 1), logits=np.zeros((3, 3)))
    expect(gf.GraphError, lambda: gf.forward_pass(loss, graph),
           "SoftmaxCrossEntropy 'loss'", "labels have shape (4,)", "logits (3, 3)",
           "one integer class per row of Input 'Z'")


@pytest.mark.parametrize("shape", [(3,), (3, 3, 1)])
def test_logits_not_2d(device, shape):
    loss, _, graph = classifier(device, logits=np.zeros(shape))
    expect(gf.GraphError, lambda: gf.forward_pass(loss, graph),
           "SoftmaxCrossEntropy 'loss'", f"logits {shape}", "logits (batch, classes)")


# -- wrong rank -----------------------------------------------------------------------------------
def test_1d_x_of_the_wrong_length_into_linear(device):
    # a 1-D X of the right length is MiniFlow's np.dot (test_issue13_api.py)
    node, _, graph = linear(device, x=np.ones(5))
    expect(gf.GraphError, lambda: gf.forward_pass(node, graph),
           "Linear 'hidden'", "X has shape (5,)", "X must be 2-D", "or 1-D", "Input 'X'")


def test_3d_w_into_linear(device):
    node, _, graph = linear(device, w=np.ones((3, 4, 1)))
    expect(gf.GraphError, lambda: gf.forward_pass(node, graph),
           "Linear 'hidden'", "W has shape (3, 4, 1)", "W 2-D (n_in, n_out)", "Input 'W'")


# -- non-numeric data -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, why", [
    (np.array([[1, "a", None]], dtype=object), "dtype object, not numbers"),
    (np.array([["1", "2", "3"]]), "dtype <U1, not numbers"),
    ([[1.0, 2.0, 3.0], [1.0]], "cannot be made into an array"),
    (np.ones((1, 3)) * 1j, "dtype complex128, not numbers"),
    (np.array([["2020-01-01"] * 3], dtype="datetime64[D]"), "dtype datetime64[D]"),
    (np.ma.array(np.ones((1, 3)), mask=[[0, 1, 0]]), "masked array"),
])
def test_non_numeric_feeds(device, bad, why):
    expect(gf.GraphError, lambda: linear(device, x=bad), "Input 'X'.value", why)
    _, (X, _, _), _ = linear(device)
    expect(gf.GraphError, lambda: setattr(X, "value", bad), "Input 'X'.value", why)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_a_numpy_matrix_becomes_a_plain_array():
    # np.matrix makes * a matrix product; it must not reach the nodes as it is
    node, (X, _, _), graph = linear("cpu")
    X.value = np.matrix(np.ones((2, 3)))
    assert type(X.value) is np.ndarray
    assert gf.forward_pass(node, graph).shape == (2, 4)


# -- integer data where floats are needed: converted to the graph's float dtype ---------------
@pytest.mark.parametrize("dtype, expected", [(None, "float64"), ("float32", "float32"),
                                             ("float64", "float64")])
def test_integer_data_is_converted_to_the_graph_float_dtype(device, dtype, expected):
    node, (X, W, B), graph = linear(device, dtype=dtype, x=np.arange(6).reshape(2, 3),
                                    w=np.ones((3, 4), dtype=np.int32), b=np.zeros(4, dtype=bool))
    want = device.dtype(expected)
    for n in (X, W, B):
        assert device.owns(n.value) and n.value.dtype == want, (n.label, n.value.dtype)
    X.value = np.arange(6, dtype=np.uint8).reshape(2, 3)  # a later integer batch, too
    assert X.value.dtype == want
    out = gf.forward_pass(node, graph)
    assert out.dtype == want
    np.testing.assert_array_equal(host(device, out), np.arange(6).reshape(2, 3).sum(1)[:, None]
                                  * np.ones((1, 4)))


def test_integer_batches_in_a_graph_become_its_dtype(device):
    graph, _ = small_graph(device, "float32")
    graph.step(np.arange(6).reshape(2, 3), np.array([0, 1]))
    assert graph.inputs[0].value.dtype == device.dtype("float32")
    assert not device.xp.isdtype(graph.inputs[1].value.dtype, "real floating")


# -- mixed dtypes in one graph ----------------------------------------------------------------
def test_mixed_float_feeds_later_take_the_graph_dtype(device):
    # dtype=None: the first feeds agree on float64, so a float32 batch later becomes float64
    node, (X, W, _), graph = linear(device)
    X.value = np.ones((2, 3), dtype=np.float32)
    assert X.value.dtype == device.dtype("float64")
    assert gf.forward_pass(node, graph).dtype == device.dtype("float64")
    # and the mix at build time is reported, naming both Inputs (test_graph has the base case)
    expect(gf.GraphError, lambda: linear(device, x=np.ones((2, 3), np.float32)),
           "Input 'X': float32", "Input 'W': float64", "promoted to float64 silently")


def test_a_float32_graph_fed_float64_stays_float32(device):
    graph, params = small_graph(device, "float32")
    loss = graph.step(np.ones((2, 3), dtype=np.float64), np.array([0, 1]))
    f32 = device.dtype("float32")
    assert graph.inputs[0].value.dtype == f32 and loss.dtype == f32
    for p in params.values():
        assert p.value.dtype == f32 and p.gradients[p].dtype == f32, p.label


def test_a_graph_dtype_that_is_not_floating():
    expect(gf.GraphError, lambda: linear("cpu", dtype="int32"),
           "dtype 'int32' is not a floating dtype", "dtype='float32'")


# -- empty batches -------------------------------------------------------------------------------
def test_empty_batch(device):
    expect(gf.GraphError, lambda: linear(device, x=np.ones((0, 3))),
           "Input 'X'", "empty batch (shape (0, 3))")
    graph, _ = small_graph(device)
    expect(gf.GraphError, lambda: graph.step(np.ones((0, 3)), np.zeros(0, dtype=np.int64)),
           "empty batch (shape (0, 3))", "drop empty batches")


# -- arrays from another device or library --------------------------------------------------------
def test_foreign_arrays_in_a_graph_step():
    torch = pytest.importorskip("torch")
    pytest.importorskip("array_api_strict")
    graph, _ = small_graph("array_api_strict:device1")
    expect(gf.DeviceError, lambda: graph.step(torch.ones(2, 3), np.array([0, 1])),
           "Input 'X'.value", "an array on torch:cpu", "the graph is on array_api_strict:device1",
           "device='torch:cpu'")


class _Opaque:
    """Something from a library gpuflow does not know."""


def test_an_object_from_an_unknown_library():
    expect(gf.DeviceError, lambda: linear("cpu", x=_Opaque()),
           "Input 'X'.value", "unknown library", "_Opaque", "numpy.asarray")


# -- Python lists and scalars as feeds -----------------------------------------------------------
def test_lists_and_scalars_in_a_graph_step(device):
    graph, _ = small_graph(device, "float64")
    loss = graph.step([[1, 2, 3], [0.5, 0, 1]], [2, 0])
    assert np.isfinite(float(host(device, loss)))
    assert device.owns(graph.inputs[0].value) and device.owns(graph.inputs[1].value)
    y, a = gf.Input(name="y"), gf.Input(name="a")
    cost = gf.MSE(y, a)
    g = gf.topological_sort({y: 3, a: [1.0]}, device=device)
    assert float(host(device, gf.forward_pass(cost, g))) == 4.0


# -- None values -------------------------------------------------------------------------------
def test_none_fed_to_a_graph_step():
    graph, _ = small_graph("cpu")
    expect(gf.GraphError, lambda: graph.step(None, np.array([0])),
           "Input 'X' has no value", "Linear 'layer1'")


def test_value_set_back_to_none_after_the_graph_is_built(device):
    node, (X, _, _), graph = linear(device)
    X.value = None
    expect(gf.GraphError, lambda: gf.forward_pass(node, graph),
           "Input 'X' has no value: None", "Linear 'hidden'", "Input 'X'.value")


# -- one node, two devices; sorting again -------------------------------------------------------
def test_a_node_in_two_graphs_on_two_devices():
    pytest.importorskip("array_api_strict")
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, [3, 4, 3])
    loss = gf.SoftmaxCrossEntropy(y, logits)
    gf.Graph(loss, device="cpu")
    gf.Graph(loss, device="cpu")  # a second graph on the same device is fine
    expect(gf.GraphError, lambda: gf.Graph(loss, device="array_api_strict:device1"),
           "already belongs to a graph on cpu", "this graph is on array_api_strict:device1",
           "build the model again")


def test_sorting_a_built_graph_again_gives_the_same_results(device):
    node, (X, W, B), graph = linear(device, x=np.arange(6.0).reshape(2, 3))
    loss = gf.MSE(gf.Input(name="target"), node)
    target = loss.inbound_nodes[0]
    feed = {X: np.arange(6.0).reshape(2, 3), W: np.linspace(0, 1, 12).reshape(3, 4),
            B: np.ones(4), target: np.zeros((2, 4))}
    first = gf.topological_sort(feed, device=device)
    gf.forward_and_backward(first)
    results = [host(device, loss.value)] + [host(device, n.gradients[n]) for n in (X, W, B)]
    again = gf.topological_sort(feed, device=device)
    assert list(again) == list(first)
    gf.forward_and_backward(again)
    for old, n in zip(results[1:], (X, W, B)):
        np.testing.assert_array_equal(host(device, n.gradients[n]), old, err_msg=n.label)
    np.testing.assert_array_equal(host(device, loss.value), results[0])


# -- updates without gradients, bad learning rates ---------------------------------------------
def test_sgd_update_without_a_gradient_changes_nothing():
    graph, params = small_graph("cpu")
    graph.step(np.ones((2, 3)), np.array([0, 1]))
    stray = gf.Input(name="stray")
    stray.value = np.ones(3)
    before = {k: p.value.copy() for k, p in params.items()}
    expect(gf.GraphError, lambda: gf.sgd_update(list(params.values()) + [stray]),
           "Input 'stray' has no gradient yet", "forward_and_backward")
    for k, p in params.items():  # regression: the parameters before 'stray' were updated
        np.testing.assert_array_equal(p.value, before[k], err_msg=f"{k} changed on refusal")


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_optimizer_step_without_a_gradient_changes_nothing(cls):
    graph, params = small_graph("cpu")
    opt = cls(graph, lr=0.1)
    expect(gf.GraphError, opt.step, "Parameter 'layer1.W' has no gradient yet",
           "graph.step(...)")
    graph.step(np.ones((2, 3)), np.array([0, 1]))
    del params["layer2.b"].gradients[params["layer2.b"]]
    before = {k: p.value.copy() for k, p in params.items()}
    expect(gf.GraphError, opt.step, "Parameter 'layer2.b' has no gradient yet")
    assert opt.t == 0
    for k, p in params.items():
        np.testing.assert_array_equal(p.value, before[k], err_msg=f"{k} changed on refusal")


BAD_LRS = [(-0.1, "finite number > 0"), (0.0, "finite number > 0"),
           (float("nan"), "finite number > 0"), (float("inf"), "finite number > 0"),
           ("0.1", "must be a number")]


@pytest.mark.parametrize("lr, why", BAD_LRS)
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_optimizers_refuse_bad_learning_rates(name, lr, why):
    graph, _ = small_graph("cpu")
    cls = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adam": "Adam",
           "adamw": "AdamW"}[name]
    expect(ValueError, lambda: make_optimizer(name, graph, lr), f"{cls}: lr", why, repr(lr),
           "lr=1e-2")


@pytest.mark.parametrize("lr, why", BAD_LRS)
def test_a_learning_rate_changed_to_a_bad_value_is_refused_at_step(lr, why):
    graph, params = small_graph("cpu")
    opt = Adam(graph, lr=0.1)
    graph.step(np.ones((2, 3)), np.array([0, 1]))
    opt.lr = lr  # e.g. a schedule that went wrong
    before = {k: p.value.copy() for k, p in params.items()}
    expect(ValueError, opt.step, "Adam: lr", why)
    for k, p in params.items():
        np.testing.assert_array_equal(p.value, before[k], err_msg=k)


@pytest.mark.parametrize("value, why", [("nan", "--lr must be a finite number > 0, got nan"),
                                        ("inf", "--lr must be a finite number > 0, got inf"),
                                        ("=-1e-3", "--lr must be a finite number > 0"),
                                        ("0", "--lr must be a finite number > 0"),
                                        ("fast", "argument --lr: invalid float value: 'fast'")])
def test_cli_refuses_bad_learning_rates(capsys, value, why):
    lr = ["--lr" + value] if value.startswith("=") else ["--lr", value]
    assert main(["train", "--device", "cpu", *lr]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpuflow train: error: "), lines
    assert why in lines[0], lines[0]
