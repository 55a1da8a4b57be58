"""The backend contract holds in the source: outside gpuflow/backends/ no module imports an
array library or switches on a backend's name; it asks the device (see backends/base.py)."""

from __future__ import annotations

import ast
import functools
import os

import pytest

from gpuflow.backends import REGISTRY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "gpuflow")

# Array libraries other than NumPy: only gpuflow/backends/ may import them.
DEVICE_LIBRARIES = {b.library for b in REGISTRY} - {"numpy"}
# Backend names and spec heads ('cupy', 'cuda', 'torch', ...): code outside the backends asks
# the device a capability instead of comparing these.
BACKEND_WORDS = {b.name for b in REGISTRY} | {h for b in REGISTRY for h in b.heads}

# NumPy is gpuflow's host format: allowed where host data is handled, and only there.
NUMPY_ALLOWED = {
    "gpuflow/bench/machine.py": "the bench's machine report: NumPy's version and BLAS library",
    "gpuflow/bench/variants.py": "the bench's host batches and initial weights",
    "gpuflow/bench/workloads.py": "the bench's host batches and initial weights",
    "gpuflow/gradcheck.py": "gradient checks: central differences on float64 host copies",
    "gpuflow/checkpoint/__init__.py": "checkpoint files are NumPy arrays on the host",
    "gpuflow/checkpoint/graph.py": "checkpoint files are NumPy arrays on the host",
    "gpuflow/checkpoint/io.py": "checkpoint files are NumPy arrays on the host",
    "gpuflow/checkpoint/meta.py": "checkpoint files are NumPy arrays on the host",
    "gpuflow/checkpoint/npz.py": "checkpoint files are NumPy arrays on the host",
    "gpuflow/runtime/placement.py": "a graph moved between devices goes through host copies; "
                                    "compare checks both devices' numbers on the host in float64",
    "gpuflow/checkpoint/weights.py": "weight files (safetensors) are NumPy arrays on the host",
    "gpuflow/cli/classifier.py": "NumPy's warning switch for --check-finite",
    "gpuflow/generate.py": "sampling: the prompt, the ids and their probabilities on the host",
    "gpuflow/export/checkpoints.py": "an example batch of host zeros for the exporters",
    "gpuflow/export/onnx_export.py": "ONNX initializers are made from host NumPy arrays",
    "gpuflow/cli/runs.py": "the run history saved in checkpoints",
    "gpuflow/data/batches.py": "data loading: host arrays cut into batches",
    "gpuflow/data/digits.py": "data loading",
    "gpuflow/data/idx.py": "data loading (IDX files)",
    "gpuflow/data/text.py": "data loading: text as host id arrays, cut into windows",
    "gpuflow/distributed/mpi.py": "MPI sums and broadcasts on host memory",
}
# Strings that look like a backend's name but name something else.
NAME_SWITCH_ALLOWED = {
    "gpuflow/checkpoint/weights.py": "layout == 'torch' names PyTorch's weight-file layout, "
                                     "not a backend",
}
# The bench's per-library floors (hand-written NumPy / torch loops) measure libraries directly.
BENCH_FLOORS = "the bench's floors measure each library directly"


def _is_bench(rel: str) -> bool:
    """One of the bench's per-library floors (gpuflow/bench/floor_<library>.py)."""
    return rel.startswith("gpuflow/bench/floor_")


def _modules() -> list[str]:
    """Every .py file of gpuflow outside gpuflow/backends/, relative to the repository."""
    found = []
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), REPO).replace(os.sep, "/")
            if name.endswith(".py") and not rel.startswith("gpuflow/backends/"):
                found.append(rel)
    return sorted(found)


def _tree(rel: str) -> ast.AST:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        return ast.parse(f.read(), rel)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level module) of every import, at any depth (function-level ones too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value.split(".")[0]))
    return out


def _strings(node: ast.AST) -> list[str]:
    """The string constants of `node`: a constant, or a tuple / list / set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def _names_a_backend(text: str) -> bool:
    """'cupy', 'torch:cuda', 'jax:cpu': a string that names a backend (its first word)."""
    return text.strip().lower().partition(":")[0] in BACKEND_WORDS


def _backend_switches(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, string) of each comparison with a backend's name (==, !=, in, startswith)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                out += [(node.lineno, s) for s in _strings(side) if _names_a_backend(s)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and node.args):
            out += [(node.lineno, s) for s in _strings(node.args[0]) if _names_a_backend(s)]
    return out


def test_the_checks_see_what_they_look_for():
    """A check that cannot fail is a defect: each one finds its target in a sample."""
    sample = ast.parse("import torch\nfrom cupy import cuda\nimport numpy as np\n"
                       "def f(d):\n    import jax.numpy\n"
                       "    if d.backend == 'cupy' or d.name in ('torch:cuda', 'x'):\n"
                       "        return d.name.startswith('jax')\n")
    assert sorted(m for _, m in _imports(sample)) == ["cupy", "jax", "numpy", "torch"]
    assert sorted(s for _, s in _backend_switches(sample)) == ["cupy", "jax", "torch:cuda"]


@pytest.mark.parametrize("rel", _modules())
def test_no_array_library_outside_backends(rel):
    if _is_bench(rel):
        pytest.skip(BENCH_FLOORS)
    found = [(line, m) for line, m in _imports(_tree(rel))
             if m in DEVICE_LIBRARIES or (m == "numpy" and rel not in NUMPY_ALLOWED)]
    assert not found, (
        f"{rel} imports {', '.join(f'{m} (line {line})' for line, m in found)}; outside "
        "gpuflow/backends/ code asks the device (device.xp, device.ops, device.put, "
        "device.to_host, a capability) instead. NumPy is allowed only where host data is "
        f"handled: {sorted(NUMPY_ALLOWED)}.")


@pytest.mark.parametrize("rel", _modules())
def test_no_switch_on_a_backend_name_outside_backends(rel):
    if _is_bench(rel):
        pytest.skip(BENCH_FLOORS)
    if rel in NAME_SWITCH_ALLOWED:
        pytest.skip(NAME_SWITCH_ALLOWED[rel])
    found = _backend_switches(_tree(rel))
    assert not found, (
        f"{rel} compares with backend names: "
        f"{', '.join(f'{s!r} (line {line})' for line, s in found)}; ask the device a "
        "capability (ops.writes_out, mutable_arrays, is_host, collectives, ...; see "
        "gpuflow/backends/base.py) or add one there.")


def test_numpy_allow_list_is_current():
    """Every module allowed NumPy exists and uses it (so the list shrinks as code moves)."""
    for rel, reason in NUMPY_ALLOWED.items():
        assert os.path.exists(os.path.join(REPO, rel)), f"{rel} ({reason}) is gone: drop it"
        assert any(m == "numpy" for _, m in _imports(_tree(rel))), \
            f"{rel} no longer imports numpy: drop it from NUMPY_ALLOWED"


MAX_LINES = 600  # a module a newcomer reads in one sitting (issue 12)


def _all_modules() -> list[str]:
    """Every .py file of gpuflow, backends included, relative to the repository."""
    found = []
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [os.path.relpath(os.path.join(root, n), REPO).replace(os.sep, "/")
                  for n in files if n.endswith(".py")]
    return sorted(found)


@pytest.mark.parametrize("rel", _all_modules())
def test_every_module_is_under_600_lines(rel):
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    assert lines < MAX_LINES, (
        f"{rel} has {lines} lines (limit {MAX_LINES}): split it by concern, as gpuflow/bench/ "
        "and the checkpoint modules are split.")


def _module_of(rel: str) -> str:
    """'gpuflow/nodes/core.py' -> 'gpuflow.nodes.core'; 'gpuflow/data/__init__.py' -> 'gpuflow.data'."""
    name = rel[:-3].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _package_imports(rel: str, known: set[str], tree: ast.AST | None = None) -> set[str]:
    """The gpuflow modules that `rel` (its source, or `tree`) imports, at any depth
    (function-level ones too)."""
    here = _module_of(rel).split(".")
    base = here if rel.endswith("__init__.py") else here[:-1]
    found = set()
    for node in ast.walk(tree or _tree(rel)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            target = (".".join(base[:len(base) - node.level + 1] + [node.module or ""]).rstrip(".")
                      if node.level else node.module or "")
            for alias in node.names:  # `from . import x`: x may be a module or a name
                full = f"{target}.{alias.name}"
                found.add(full if full in known else target)
    return (found & known) - {_module_of(rel)}


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle [a, b, ..., a] in `edges` (module -> modules it imports), or []."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for other in sorted(edges.get(module, ())):
            if found := visit(other, path + [module]):
                return found
        done.add(module)
        return []

    for module in sorted(edges):
        if found := visit(module, []):
            return found
    return []


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


# A node's binding (device, xp, ops, buffers, plan, dtype rules) and the private attributes
# the plan keeps on a node: gpuflow/runtime/plan.py alone writes them; node code only reads them.
BINDING_OWNER = "gpuflow/runtime/plan.py"
BINDING_ATTRIBUTES = {"_binding", "device", "xp", "ops", "buffers", "_plan", "_float_dtype",
                      "_keep_integers", "_private", "_grad_seed", "_senders", "_value",
                      "_graph"}  # _graph: the Graph that steps a parameter (plan.record_graph)


def _assignment_targets(node: ast.AST) -> list[ast.AST]:
    """What an assignment statement writes (a tuple target unpacked); [] for other nodes."""
    targets: list[ast.AST] = []
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        for target in getattr(node, "targets", None) or [node.target]:
            targets += target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
    return targets


def _binding_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of each write of a node's binding attribute: `x.<name> = ...` (an Input's
    own `self._value = ...` aside), `setattr(x, '<name>', ...)`, `vars(x).pop('<name>')`, and
    `vars(x)` or `x.__dict__` cleared or updated (which replaces every attribute)."""
    out = []
    for node in ast.walk(tree):
        targets = _assignment_targets(node)
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr in BINDING_ATTRIBUTES and not (
                    target.attr == "_value" and isinstance(target.value, ast.Name)
                    and target.value.id == "self"):
                out.append((target.lineno, f"{ast.unparse(target)} ="))
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        names = {s for a in node.args[1:2] for s in _strings(a)}
        if isinstance(func, ast.Name) and func.id == "setattr" and names & BINDING_ATTRIBUTES:
            out.append((node.lineno, "setattr"))
        if isinstance(func, ast.Attribute) and func.attr in ("clear", "update", "pop"):
            holder = func.value
            whole = (isinstance(holder, ast.Attribute) and holder.attr == "__dict__") or (
                isinstance(holder, ast.Call) and isinstance(holder.func, ast.Name)
                and holder.func.id == "vars")
            popped = {s for a in node.args[:1] for s in _strings(a)}
            if whole and (func.attr != "pop" or popped & BINDING_ATTRIBUTES):
                out.append((node.lineno, f"{ast.unparse(holder)}.{func.attr}"))
    return sorted(out)


# Writes the check cannot tell from a node's: (module, what) -> why they are not a node's.
BINDING_ALLOWED = {
    ("gpuflow/runtime/amp.py", "optimizer.ops ="): "an optimizer's ops (the parameter's it updates)",
    ("gpuflow/compiled.py", "opt.ops ="): "an optimizer's ops (the parameter's it updates)",
    ("gpuflow/compiled.py", "vars(opt).clear"): "the optimizer, put back after tracing",
    ("gpuflow/compiled.py", "vars(opt).update"): "the optimizer, put back after tracing",
    ("gpuflow/optim.py", "self._graph ="): "an optimizer's own Graph (Optimizer(graph))",
}
PUBLIC_BINDING = {"device", "xp", "ops", "buffers"}  # names other objects use too


@functools.lru_cache(maxsize=None)
def _node_classes() -> frozenset[str]:
    """The names of gpuflow's Node classes (Node and every class deriving from one)."""
    bases = {}
    for rel in _modules():
        for node in ast.walk(_tree(rel)):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {ast.unparse(b).split(".")[-1] for b in node.bases}
    found, grown = {"Node"}, True
    while grown:
        more = {name for name, b in bases.items() if b & found} - found
        found |= more
        grown = bool(more)
    return frozenset(found)


def _self_in_other_classes(tree: ast.AST, nodes: set[str]) -> set[int]:
    """The lines of the classes that are not Node classes: their `self` is no node."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name not in nodes:
            lines |= set(range(node.lineno, node.end_lineno + 1))
    return lines


def test_the_binding_check_sees_what_it_looks_for():
    sample = ast.parse("def f(n, kept):\n    n._plan = None\n    n.a, n._private = 1, 2\n"
                       "    setattr(n, '_binding', 0)\n    vars(n).clear()\n"
                       "    n.__dict__.update(kept)\n    vars(n).pop('_binding')\n"
                       "    n._value = 1\n    self._value = 1\n    vars(n).pop('forward')\n"
                       "    p._graph = ref\n")
    assert [line for line, _ in _binding_writes(sample)] == [2, 3, 4, 5, 6, 7, 8, 11]


@pytest.mark.parametrize("rel", [r for r in _modules() if r != BINDING_OWNER])
def test_only_the_plan_writes_a_nodes_binding(rel):
    """Binding a node (its device, xp, ops, buffers, plan, dtype rules, the loss's seed) and
    releasing it is gpuflow/runtime/plan.py's: other modules call its `bind`, `unbind`, `detach`,
    `snapshot`/`restore`, `put_values`, `record_graph` (the Graph that steps a parameter),
    `Plan.set_buffers` and `Plan.seed_loss`."""
    tree = _tree(rel)
    others = _self_in_other_classes(tree, _node_classes())
    found = [(line, what) for line, what in _binding_writes(tree)
             if (rel, what) not in BINDING_ALLOWED and not (
                 line in others and what.startswith("self.")
                 and what.split(".")[1].split(" ")[0] in PUBLIC_BINDING)]
    assert not found, (f"{rel} writes a node's binding at line(s) "
                       f"{', '.join(f'{line} ({what})' for line, what in found)}.\nhelp: ask "
                       "gpuflow/runtime/plan.py (a function or Plan method there) to do it.")


# Another object's private attribute (`x._name = ...`, `x._name += ...`,
# `setattr(x, '_name', ...)`, x neither `self` nor `cls`) is written in plan.py alone: a node's
# private state is its own or its plan's. Writes that are not on another node, or that are a
# node's own state written by a helper of its class: (module, what) -> why.
PRIVATE_ALLOWED = {
    ("gpuflow/nodes/conv.py", "node._zero_border"):
        "_padded(node, ...) is Conv2D's own helper, called as _padded(self, ...): the node's "
        "own kept-buffer mark",
    ("gpuflow/nodes/core.py", "__init__._unlinks_on_error"):
        "a mark on Node.__init__ (the function), not on a node",
    ("gpuflow/compiled.py", "opt._param"):
        "an optimizer's current parameter, set by the step that runs its update",
    ("gpuflow/runtime/amp.py", "optimizer._param"):
        "an optimizer's current parameter, set by the step that runs its update",
    ("gpuflow/schedules.py", "self.optimizer._checked_lr"):
        "a schedule's rate is checked by the schedule (0 allowed): the optimizer's lr check "
        "is skipped for it",
}


def _all_modules() -> list[str]:
    """Every .py file of gpuflow, gpuflow/backends/ included."""
    return sorted({*_modules(), *(
        f"gpuflow/backends/{name}" for name in os.listdir(os.path.join(PACKAGE, "backends"))
        if name.endswith(".py"))})


def _private_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of each write of a private attribute (`_name`, not `__name__`) of an object
    other than `self` or `cls`: assigned (=, +=, annotated, in a tuple), or `setattr` with a
    literal name."""
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    def own(holder: ast.AST) -> bool:
        return isinstance(holder, ast.Name) and holder.id in ("self", "cls")

    out = []
    for node in ast.walk(tree):
        targets = _assignment_targets(node)
        out += [(t.lineno, ast.unparse(t)) for t in targets
                if isinstance(t, ast.Attribute) and private(t.attr) and not own(t.value)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "setattr" and len(node.args) >= 2 and not own(node.args[0]) \
                and any(private(s) for s in _strings(node.args[1])):
            out.append((node.lineno, f"{ast.unparse(node.args[0])}.{_strings(node.args[1])[0]}"))
    return sorted(out)


def test_the_private_write_check_sees_what_it_looks_for():
    sample = ast.parse("def f(n, ids):\n    n._seed_in = 1\n    ids._classes += 1\n"
                       "    self._x = cls._y = 1\n    n.a, n._b = 1, 2\n"
                       "    setattr(n, '_kept', 0)\n    setattr(self, '_z', 0)\n"
                       "    n.__doc__ = ''\n    n.public = 1\n    x: int = n._c\n"
                       "    n.d._e: int = 1\n")
    assert _private_writes(sample) == [(2, "n._seed_in"), (3, "ids._classes"), (5, "n._b"),
                                       (6, "n._kept"), (11, "n.d._e")]


@pytest.mark.parametrize("rel", [r for r in _all_modules() if r != BINDING_OWNER])
def test_only_the_plan_writes_another_objects_private_attributes(rel):
    """A node's private attributes are its own (or its plan's, gpuflow/runtime/plan.py): a
    consumer configures an Input through `Input.expect_classes`, the runtimes keep their
    per-node state in their own dicts or ask plan.py (`put_seeds`), a Graph makes its own
    weak reference."""
    found = [(line, what) for line, what in _private_writes(_tree(rel))
             if (rel, what) not in PRIVATE_ALLOWED]
    assert not found, (f"{rel} writes another object's private attribute at line(s) "
                       f"{', '.join(f'{line} ({what})' for line, what in found)}.\nhelp: call "
                       "a public method of its owner, or a function of gpuflow/runtime/plan.py "
                       "for a node's runtime state; keep a runtime's own per-node state in "
                       "its own dict keyed by node.")


def test_private_allow_list_is_current():
    """Every allowed write still exists (a stale entry would hide a new one)."""
    found = {(rel, what) for rel in _all_modules() for _, what in _private_writes(_tree(rel))}
    assert set(PRIVATE_ALLOWED) <= found, set(PRIVATE_ALLOWED) - found


def test_a_bound_nodes_attributes_are_its_bindings():
    """plan.py sets a Binding's fields on the node (plain attributes, read in every op)."""
    import gpuflow as gf
    X = gf.Input(name="X")
    loss = gf.MSE(X, X)
    graph = gf.topological_sort({X: [[1.0, 2.0]]})
    for node in (X, loss):
        b = node._binding
        assert (node.device, node.xp, node.ops, node.buffers, node._plan) == (
            b.device, b.xp, b.ops, b.buffers, b.plan) and b.plan is graph.plan
    assert (X._float_dtype, X._keep_integers, X._private) == (
        X._binding.float_dtype, X._binding.keep_integers, X._binding.private)


def test_placement_uses_only_the_graphs_public_methods():
    """gpuflow/runtime/placement.py moves graphs through `Graph.move_to` and `Graph.trial`: it
    reads no private attribute of a graph (nor of its plan or mixed precision) and assigns none
    of the graph's attributes."""
    found = []
    for node in ast.walk(_tree("gpuflow/runtime/placement.py")):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in (
                "graph", "self.graph", "graph.plan", "graph.amp") and (
                node.attr.startswith("_") or isinstance(node.ctx, ast.Store)):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    assert not found, f"placement.py reaches into the graph: {found}"


def test_modules_outside_backends_import_one_another_one_way():
    """No circle of imports, lazy ones included: a lower module never reaches back up (a
    function-level import that only hides a circle still ties both modules together).
    gpuflow/backends/ is left out: its registry and its backends import one another."""
    known = {_module_of(rel) for rel in _modules()}
    edges = {_module_of(rel): _package_imports(rel, known) for rel in _modules()}
    cycle = _cycle(edges)
    assert not cycle, (
        f"import circle: {' -> '.join(cycle)}; move what the lower module needs into a "
        "module both can import (as gpuflow/checkpoint/io.py and meta.py are).")


# The command line (gpuflow/cli/) sits on top: it imports the library, nothing imports it. The
# one exception is the entry point that runs it.
CLI = "gpuflow.cli"
CLI_ENTRY_POINTS = {"gpuflow/__main__.py": "`python -m gpuflow` is the gpuflow command"}


def _cli_imports(rel: str, known: set[str], tree: ast.AST | None = None) -> list[str]:
    """The modules of gpuflow/cli/ that `rel` imports, at any depth (lazy ones too), also
    through importlib.import_module('gpuflow.cli...')."""
    tree = tree or _tree(rel)
    found = _package_imports(rel, known, tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"):
            found |= set(_strings(node.args[0])) if node.args else set()
    return sorted(m for m in found if m == CLI or m.startswith(f"{CLI}."))


def test_the_cli_check_sees_what_it_looks_for():
    known = {CLI, f"{CLI}.runs", f"{CLI}.textrun", "gpuflow.export", "gpuflow.errors"}
    lazy = ast.parse("from ..errors import ExportError\n"
                     "def f():\n    from ..cli.runs import build_model\n")
    assert _cli_imports("gpuflow/export/x.py", known, lazy) == [f"{CLI}.runs"]
    absolute = ast.parse("import gpuflow as gf\nimport importlib\ndef f():\n"
                         "    from gpuflow.cli import main\n"
                         "    importlib.import_module('gpuflow.cli.textrun')\n")
    assert _cli_imports("gpuflow/bench/__init__.py", known, absolute) == [
        CLI, f"{CLI}.textrun"]
    assert _cli_imports("gpuflow/export/x.py", known,
                        ast.parse("from .. import errors\n")) == []


@pytest.mark.parametrize("rel", [r for r in _all_modules() if not r.startswith("gpuflow/cli/")])
def test_nothing_outside_the_cli_imports_it(rel):
    """Data flows down: the command line parses argv and calls the library; the library (the
    exporters, the bench) never reaches back up into gpuflow/cli/ (which imports all of it)."""
    if rel in CLI_ENTRY_POINTS:
        pytest.skip(CLI_ENTRY_POINTS[rel])
    known = {_module_of(r) for r in _all_modules()}
    found = _cli_imports(rel, known)
    assert not found, (
        f"{rel} imports {', '.join(found)}; the command line is the top layer and nothing "
        "below it imports it.\nhelp: move what both need into a module below both "
        "(gpuflow/models.py builds a run's model, gpuflow/commandline.py holds the parser "
        "every command shares).")
