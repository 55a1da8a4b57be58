"""Checkpoints that cannot load, in both formats (safetensors, and the old .npz read path): every
failure is one CheckpointError naming the file, with one message and one help line, and the
model, the optimizer and the schedule are left exactly as they were."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import safetensors
from safetensors.numpy import save as st_bytes

import gpuflow
from gpuflow.checkpoint import CHECKPOINT_FORMAT, load, save
from gpuflow.cli import main
from gpuflow.errors import CheckpointError
from gpuflow.optim import Adam

from legacy_npz import legacy_save
from test_checkpoint import assert_unchanged, build, snapshot, trained


# -- making bad files ---------------------------------------------------------------------------
def good(tmp_path, fmt, **build_args):
    """A good checkpoint of a trained model, in format `fmt`: its path."""
    graph, opt = trained("cpu", steps=1) if not build_args else (build(**build_args), None)
    opt = opt if opt is not None else Adam(graph)
    path = tmp_path / f"good-{len(list(tmp_path.iterdir()))}.{fmt}"
    state = {"big": np.arange(2000.0), "n": 3}
    (save if fmt == "safetensors" else legacy_save)(path, graph, opt, step=1, state=state)
    return path


def contents(path):
    """(metadata JSON, arrays, string metadata) of a checkpoint in either format."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        return json.loads(arrays.pop("__gpuflow__").tobytes()), arrays, {}
    with safetensors.safe_open(path, framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    return json.loads(metadata["gpuflow"]), arrays, metadata


def crc(array):
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


def rewrite(src, dst, edit, fix_crc=True, edit_text=lambda text: text):
    """Rewrite checkpoint `src` to `dst` after `edit(meta, arrays)` (and `edit_text` of the
    metadata's JSON text), consistently: the damage is only what the edits did (checksums are
    recomputed)."""
    meta, arrays, metadata = contents(src)
    edit(meta, arrays)
    if src.suffix == ".npz":
        text = edit_text(json.dumps(meta)).encode()
        np.savez(dst, __gpuflow__=np.frombuffer(text, dtype=np.uint8), **arrays)
        return
    if fix_crc and isinstance(meta, dict) and "crc32" in meta:
        meta["crc32"] = {k: crc(v) for k, v in arrays.items()}
    text = edit_text(json.dumps(meta))
    metadata.update(gpuflow=text, gpuflow_crc32=str(zlib.crc32(text.encode())))
    dst.write_bytes(st_bytes(arrays, metadata=metadata))


def raw_safetensors(header, data=b""):
    """A safetensors file from a header dict and data bytes, without the library's checks."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def flip_middle(path):
    data = bytearray(path.read_bytes())
    mid = len(data) * 3 // 4  # in the buffers of either format
    data[mid:mid + 16] = bytes(16)
    data[mid + 16:mid + 32] = b"\xff" * 16
    return bytes(data)


def edited(edit, fix_crc=True):
    return lambda path, fmt, tmp: rewrite(good(tmp, fmt), path, edit, fix_crc)


def drop(key):
    return edited(lambda meta, arrays: arrays.pop(key))


def meta_set(*where_value):
    return edited(meta_edit(*where_value))


def meta_edit(*where_value):
    def edit(meta, arrays):
        *keys, last, value = where_value
        target = meta
        for k in keys:
            target = target[k]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return edit


def nested(depth, *where):
    """JSON arrays nested `depth` deep at meta[where...], checksums matching (json.dumps cannot
    write them: the metadata's text is edited)."""
    mark = "@nested@"
    return lambda path, fmt, tmp: rewrite(
        good(tmp, fmt), path, meta_edit(*where, mark),
        edit_text=lambda text: text.replace(f'"{mark}"', "[" * depth + "]" * depth))


def as_dtype(key, dtype):
    def edit(meta, arrays):
        arrays[key] = arrays[key].astype(dtype)
    return edited(edit)


def made_from(**build_args):
    return lambda path, fmt, tmp: path.write_bytes(good(tmp, fmt, **build_args).read_bytes())


EITHER = ("safetensors", "npz")
BAD = {  # case: (formats, make(path, fmt, tmp_path), texts the message holds)
    "missing": (EITHER, lambda p, f, t: None, ["does not exist"]),
    "directory": (EITHER, lambda p, f, t: p.mkdir(), ["is a directory"]),
    "empty": (EITHER, lambda p, f, t: p.write_bytes(b""), ["empty (0 bytes)"]),
    "garbage": (EITHER, lambda p, f, t: p.write_bytes(np.random.default_rng(1).bytes(4096)),
                ["not a gpuflow checkpoint", "neither a safetensors file nor an .npz"]),
    "pickle": (EITHER, lambda p, f, t: p.write_bytes(pickle.dumps({"W": np.ones(3)})),
               ["not a gpuflow checkpoint", "Python pickle"]),
    "npy": (EITHER, lambda p, f, t: p.write_bytes(npy_bytes(np.ones(3))), ["single .npy array"]),
    "truncated": (EITHER, lambda p, f, t: p.write_bytes(good(t, f).read_bytes()[:1500]),
                  ["is damaged (truncated or corrupted?)"]),
    "corrupted": (EITHER, lambda p, f, t: p.write_bytes(flip_middle(good(t, f))),
                  ["is damaged (truncated or corrupted?)"]),
    "other-format": (EITHER, meta_set("format", "something-else"),
                     ["not a gpuflow checkpoint", "'something-else'"]),
    "newer-format": (EITHER, meta_set("format_version", CHECKPOINT_FORMAT + 1),
                     [f"format version {CHECKPOINT_FORMAT + 1}",
                      f"reads versions 1..{CHECKPOINT_FORMAT}"]),
    "member-missing": (EITHER, drop("param/layer2.b"), ["damaged", "lists 'param/layer2.b'"]),
    "other-shapes": (EITHER, made_from(sizes=(64, 16, 10)),
                     ["does not fit this model", "'layer1.W': expected shape (64, 32) "
                      "(this model), actual (64, 16)", "'layer2.W': expected shape (32, 10)"]),
    "other-names": (EITHER, made_from(name="enc"),
                    ["'layer1.W' (shape (64, 32)) is missing from the checkpoint",
                     "'enc2.b' (shape (10,)) is in the checkpoint but not in this model"]),
    "extra-layer": (EITHER, made_from(sizes=(64, 32, 10, 10)),
                    ["'layer3.W' (shape (10, 10)) is in the checkpoint but not in this model"]),
    "fewer-layers": (EITHER, made_from(sizes=(64, 10)),
                     ["'layer2.W' (shape (32, 10)) is missing from the checkpoint"]),
    # damaged metadata: issue 13 item 7 (these escaped as ValueError/TypeError/KeyError)
    "step-a-str": (EITHER, meta_set("step", "3"), ["damaged metadata: step is \"3\" (a str), "
                                                   "expected an int"]),
    "step-a-float": (EITHER, meta_set("step", 3.5), ["step is 3.5 (a float), expected an int"]),
    "epoch-a-list": (EITHER, meta_set("epoch", [1]), ["epoch is [1] (a list), expected an int"]),
    # issue 18 item 10: negative counters ("epoch -2/2" and five epochs trained)
    "negative-epoch": (EITHER, meta_set("epoch", -3), ["epoch is -3 (a int), expected an int >= 0"]),
    "negative-step": (EITHER, meta_set("step", -1), ["step is -1 (a int), expected an int >= 0"]),
    "t-a-str": (EITHER, meta_set("optimizer", "t", "1"), ["optimizer.t is \"1\" (a str)"]),
    "float-a-list": (EITHER, meta_set("state", "f", {"kind": "float", "value": [0.5]}),
                     ["state['f'].value is [0.5] (a list), expected a number"]),
    "entry-without-value": (EITHER, meta_set("state", "n", "value", KeyError),
                            ["state['n'].value is missing"]),
    "entry-without-kind": (EITHER, meta_set("state", "n", {"value": 3}),
                           ["state['n'].kind is missing"]),
    "unknown-kind": (EITHER, meta_set("state", "n", "kind", "pickle"),
                     ["state['n'] has unknown kind 'pickle'"]),
    "parameters-a-dict": (EITHER, meta_set("parameters", {}),
                          ["parameters is {} (a dict), expected a list"]),
    "negative-shape": (EITHER, meta_set("parameters", 0, "shape", [-64, 32]),
                       ["parameters[0].shape[0] is -64 (a int), expected an int >= 0"]),
    "no-class": (EITHER, meta_set("optimizer", "class", KeyError), ["optimizer.class is missing"]),
    "buffers-a-list": (EITHER, meta_set("optimizer", "buffers", ["m"]),
                       ["optimizer.buffers is [\"m\"] (a list), expected a JSON object"]),
    "amp-scale-negative": (("safetensors",), meta_set("amp", {"dtype": "float16", "scaler": {
        "scale": {"kind": "float", "value": -1.0}, "good_steps": {"kind": "int", "value": 0},
        "skipped": {"kind": "int", "value": 0}}}), ["amp.scaler['scale'] is -1.0, expected a "
                                                    "finite number > 0"]),
    # issue 18 item 8: a RecursionError (28-line traceback from gpuflow train --resume)
    "nested-100000-deep": (EITHER, nested(100_000, "state", "n", "value"),
                           ["damaged metadata", "its JSON is nested 100003 deep, where "
                            "gpuflow's metadata nests at most 64 deep"]),
    "nested-900-deep": (EITHER, nested(900, "step"), ["nested 901 deep"]),
    "nested-unknown-key": (EITHER, nested(100_000, "comment"), ["nested 100001 deep"]),
    "meta-a-list": (EITHER, edited(lambda m, a: m.clear()), ["not a gpuflow checkpoint"]),
    # a member of the wrong dtype (was a GraphError without the file's name)
    "param-int": (EITHER, as_dtype("param/layer1.W", np.int64),
                  ["'param/layer1.W' has dtype int64, where a checkpoint holds floating-point"]),
    "param-complex": (EITHER, as_dtype("param/layer1.b", np.complex64),
                      ["'param/layer1.b' has dtype complex64"]),
    "param-bool": (EITHER, as_dtype("optim/layer1.b/m", bool), ["'optim/layer1.b/m' has dtype"]),
    "param-str": (("npz",), as_dtype("param/layer1.b", "U3"), ["'param/layer1.b' has dtype <U3"]),
    "param-bytes": (("npz",), as_dtype("param/layer1.b", "S3"), ["'param/layer1.b' has dtype |S3"]),
    "state-str-array": (("npz",), as_dtype("optim/layer1.W/v", "U1"), ["has dtype <U1"]),
    # what safetensors' own parser refuses
    "huge-shape": (("safetensors",), lambda p, f, t: p.write_bytes(raw_safetensors(
        {"param/layer1.W": {"dtype": "F64", "shape": [10**12], "data_offsets": [0, 8]}},
        bytes(8))), ["is damaged", "safetensors:"]),
    "huge-header": (("safetensors",), lambda p, f, t: p.write_bytes(
        struct.pack("<Q", 2**60) + b"{}"), ["is damaged", "safetensors:"]),
    "overlapping": (("safetensors",), lambda p, f, t: p.write_bytes(raw_safetensors(
        {"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]},
         "b": {"dtype": "F64", "shape": [2], "data_offsets": [8, 24]}}, bytes(24))),
        ["is damaged", "safetensors:"]),
    "unknown-dtype": (("safetensors",), lambda p, f, t: p.write_bytes(raw_safetensors(
        {"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))),
        ["is damaged", "safetensors:"]),
    "bfloat16": (("safetensors",), lambda p, f, t: p.write_bytes(raw_safetensors(
        {"param/layer1.b": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, bytes(2))),
        ["dtypes NumPy cannot hold: 'param/layer1.b' (BF16)"]),
    "no-gpuflow-metadata": (("safetensors",), lambda p, f, t: p.write_bytes(st_bytes(
        {"0.weight": np.ones((2, 2))})), ["a safetensors file without gpuflow's metadata",
                                          "[0.weight]", "load_weights"]),
    "metadata-changed": (("safetensors",), lambda p, f, t: p.write_bytes(
        good(t, f).read_bytes().replace(b'\\"step\\": 1', b'\\"step\\": 7')),
        ["metadata does not match its checksum (CRC-32)"]),
    "tensors-swapped": (("safetensors",), edited(lambda m, a: a.update(
        {"param/layer1.b": a["optim/layer1.b/m"], "optim/layer1.b/m": a["param/layer1.b"]}),
        fix_crc=False), ["does not match its checksum (CRC-32)"]),
    "extra-tensor": (("safetensors",), edited(lambda m, a: a.update(x=np.ones(2))),
                     ["holds ['x'], which its metadata does not list"]),
    "plain-npz": (("npz",), lambda p, f, t: np.savez(p, W=np.ones((64, 32))),
                  ["without the '__gpuflow__' metadata", "[W]"]),
    "bad-json": (("npz",), lambda p, f, t: np.savez(
        p, __gpuflow__=np.frombuffer(b"{not json", dtype=np.uint8)), ["metadata is unreadable"]),
}
CASES = [(case, fmt) for case, (formats, _, _) in BAD.items() for fmt in formats]


@pytest.mark.parametrize("case, fmt", CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_bad_file_is_one_checkpoint_error_and_changes_nothing(tmp_path, case, fmt):
    _, make, texts = BAD[case]
    path = tmp_path / f"{case}.{fmt}"
    make(path, fmt, tmp_path)
    graph, opt = trained("cpu", steps=2)
    before = snapshot(graph, opt)
    with pytest.raises(CheckpointError) as info:
        load(path, graph, opt)
    message = str(info.value)
    assert str(path) in message, message
    for text in texts:
        assert text in message, f"{text!r} not in {message!r}"
    lines = message.splitlines()
    assert lines[-1].startswith("help: ") and sum(x.startswith("help:") for x in lines) == 1, \
        message  # one message, one help line: nothing nested
    assert "Error:" not in message, message
    assert_unchanged(graph, opt, before)


def test_every_entry_point_names_the_file_once(tmp_path):
    """The checks raise without the path; save, load, read_info, load_weights, export_weights
    and the npz reader each put it in once: a plain CheckpointError, the path in it once."""
    from gpuflow.checkpoint import export_weights, load_weights, read_info
    graph, opt = trained("cpu", steps=1)
    damaged = tmp_path / "d.safetensors"
    rewrite(good(tmp_path, "safetensors"), damaged, lambda m, a: m.update(step=-1))
    plain_npz, weights = tmp_path / "plain.npz", tmp_path / "weights.safetensors"
    np.savez(plain_npz, W=np.ones(2))
    weights.write_bytes(st_bytes({"0.weight": np.ones((2, 2))}))
    target = tmp_path / "out.safetensors"
    calls = {
        "save": (target, lambda: save(target, graph, opt, state={"x": object()})),
        "load": (damaged, lambda: load(damaged, graph, opt)),
        "read_info": (damaged, lambda: read_info(damaged)),
        "npz": (plain_npz, lambda: read_info(plain_npz)),
        "load_weights": (weights, lambda: load_weights(graph, weights, layout="keras")),
        "export_weights": (target, lambda: export_weights(graph, target, mapping={"no": "x"})),
    }
    for name, (path, call) in calls.items():
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert type(info.value) is CheckpointError, (name, type(info.value))
        assert message.count(repr(str(path))) == 1, (name, message)


def test_brackets_inside_metadata_strings_are_not_nesting(tmp_path):
    """The nesting limit (item 8) counts JSON's arrays and objects, not brackets in strings."""
    graph, opt = trained("cpu", steps=1)
    text = "[{" * 5000 + '\\"[' + "\"{"
    save(tmp_path / "s.safetensors", graph, opt, state={"s": text})
    assert load(tmp_path / "s.safetensors", graph, opt)["state"]["s"] == text


@pytest.mark.parametrize("case", ["step-a-str", "entry-without-value", "param-complex",
                                  "corrupted", "truncated", "nested-100000-deep"])
@pytest.mark.parametrize("fmt", EITHER)
def test_gpuflow_train_resume_of_a_bad_file_prints_one_line(tmp_path, capsys, case, fmt):
    _, make, texts = BAD[case]
    path = tmp_path / f"bad.{fmt}"
    make(path, fmt, tmp_path)
    argv = ["train", "--device", "cpu", "--dtype", "float64", "--hidden", "32", "--epochs", "1",
            "--quiet", "--resume", str(path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("gpuflow train: error: "), captured.err
    assert str(path) in err[0] and texts[0] in err[0] and "help: " in err[0], err[0]


@pytest.mark.parametrize("where, value, expected", [
    (("epoch",), -3, "epoch is -3 (a int), expected an int >= 0"),
    (("schedule", "state", "last_epoch", "value"), -3,
     "schedule.state: CosineAnnealingLR.load_state_dict: last_epoch is -3, expected a whole "
     "number >= 0"),
    (("schedule", "state", "T_max", "value"), 0, "T_max is 0, expected a whole number >= 1"),
    ("node", -1, "the counter 'steps' of Dropout"),
])
def test_gpuflow_train_resume_refuses_negative_counters(tmp_path, capsys, where, value,
                                                        expected):
    """Issue 18 item 10: a crafted checkpoint with `epoch: -3` printed "epoch -2/2" and trained
    five epochs; every counter (epoch, step, the schedule's epoch and sizes, Dropout's step
    count) is checked, one CheckpointError before anything is assigned."""
    good_path = tmp_path / "good.safetensors"
    base = ["train", "--device", "cpu", "--hidden", "8", "--quiet", "--dropout", "0.1",
            "--schedule", "cosine"]
    assert main([*base, "--epochs", "1", "--save", str(good_path)]) == 0
    bad = tmp_path / "bad.safetensors"

    def edit(meta, arrays):
        if where == "node":
            [key] = [k for k in arrays if k.startswith("node/") and k.endswith("/steps")]
            arrays[key] = np.asarray(value, dtype=np.int64)
        else:
            meta_edit(*where, value)(meta, arrays)

    rewrite(good_path, bad, edit)
    capsys.readouterr()
    assert main([*base, "--epochs", "2", "--resume", str(bad)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and str(bad) in err[0], err
    assert "epoch" not in captured.out, captured.out


def test_gpuflow_train_resume_of_other_state_prints_one_line(tmp_path, capsys):
    """A good checkpoint whose extra state is not gpuflow train's (losses a number, not a
    list) was a TypeError traceback."""
    graph, opt = trained("cpu", steps=1)
    path = tmp_path / "other.safetensors"
    save(path, graph, opt, epoch=1, state={"losses": 5, "batches_epoch": 1})
    argv = ["train", "--device", "cpu", "--dtype", "float64", "--hidden", "32", "--epochs", "2",
            "--optimizer", "adam", "--quiet", "--resume", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {str(path)!r} holds no state of gpuflow train" in \
        err[0] and "help: resume from a file written by gpuflow train --save" in err[0], err


def test_gpuflow_train_save_to_npz_is_refused_before_training(tmp_path, capsys):
    argv = ["train", "--device", "cpu", "--epochs", "1", "--save", str(tmp_path / "run.npz")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "writes safetensors checkpoints, not .npz" in err[0], err
    assert "epoch" not in captured.out and list(tmp_path.iterdir()) == []


def test_python_m_gpuflow_cli_resume_bad_prints_one_line_not_a_traceback(tmp_path):
    path = tmp_path / "bad.npz"
    BAD["entry-without-value"][1](path, "npz", tmp_path)  # was a KeyError traceback
    result = subprocess.run([sys.executable, "-m", "gpuflow.cli", "train", "--device", "cpu",
                             "--resume", str(path)], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(gpuflow.__file__)))
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "state['n'].value is missing" in result.stderr and str(path) in result.stderr
