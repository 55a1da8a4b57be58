"""PyTorch tensors: the 'torch:cpu' and 'torch:cuda[:N]' devices."""

from __future__ import annotations

from typing import Any

from ..errors import DeviceError
from .base import Device, Ops, UfuncOps, missing_library

EXAMPLE_SPECS = ("torch:cpu",)
import_problem = missing_library("torch")


class TorchOps(UfuncOps):
    """torch's functions with `out=` (see `Ops`); a Python number is fine on either side."""

    def __init__(self, xp: Any) -> None:
        import torch
        # torch's own functions, bound as they are (maximum is TorchOps' own: see below).
        super().__init__(xp, torch, routes={
            "matmul": torch.matmul, "add": torch.add, "subtract": torch.subtract,
            "multiply": torch.multiply, "divide": torch.divide, "tanh": torch.tanh,
            "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt})
        self._tensor = torch.Tensor
        self._maximum, self._clamp_min = torch.maximum, torch.clamp_min
        self._gt, self._eq, self._sum, self._amax = torch.gt, torch.eq, torch.sum, torch.amax
        self._stack = torch.stack
        self._index_dtypes = (torch.int64, torch.int32)  # what torch's indexing kernels take
        self._conv2d = torch.nn.functional.conv2d
        self._conv_backward = torch.ops.aten.convolution_backward
        self._aten = torch.ops.aten
        self._addmm = torch.addmm
        self._erf, self._index_select, self._zeros = torch.special.erf, torch.index_select, \
            torch.zeros

    def maximum(self, x1: Any, x2: Any, out: Any = None) -> Any:
        if not isinstance(x2, self._tensor):   # torch.maximum takes tensors only
            return self._clamp_min(x1, x2, out=out)
        if not isinstance(x1, self._tensor):
            return self._clamp_min(x2, x1, out=out)
        return self._maximum(x1, x2, out=out)

    def greater(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        if out is None:
            return self._gt(x1, x2).to(dtype)
        return self._gt(x1, x2, out=out)  # True/False written as 1/0 in out's dtype

    def equal(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        if out is None:
            return self._eq(x1, x2).to(dtype)
        return self._eq(x1, x2, out=out)

    def sum(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        if axis == ():  # no axis: x itself (torch's sum(dim=()) sums over every axis)
            return self.copy(x, out=out)
        return self._sum(x, dim=axis, keepdim=keepdims, out=out)

    def max(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self._amax(x, dim=() if axis is None else axis, keepdim=keepdims, out=out)

    def stack(self, arrays: list, axis: int = 0, out: Any = None) -> Any:
        return self._stack(arrays, dim=axis, out=out)

    def erf(self, x: Any, out: Any = None) -> Any:
        return self._erf(x, out=out)

    def _index(self, ids: Any) -> Any:
        """ids as torch's indexing kernels take them: int64 or int32 (uint8, int8 and int16
        ids, which NumPy and the array API index with, widened to int64)."""
        return ids if ids.dtype in self._index_dtypes else ids.long()

    def take_rows(self, table: Any, ids: Any, out: Any = None) -> Any:
        return self._index_select(table, 0, self._index(ids), out=out)

    def copy(self, x: Any, out: Any = None) -> Any:
        return x.clone() if out is None else out.copy_(x)

    def scatter_add_rows(self, ids: Any, values: Any, rows: int, out: Any = None) -> Any:
        """torch.nn.functional.embedding's backward: index_add_ into zeros."""
        if out is None:
            out = self._zeros((rows, values.shape[1]), dtype=values.dtype, device=values.device)
        else:
            out.zero_()
        return out.index_add_(0, self._index(ids), values)

    def conv2d(self, x: Any, w: Any, bias: Any, stride: tuple, padding: tuple) -> Any:
        """gpuflow.Conv2D's value by torch's own convolution (oneDNN on CPUs, cuDNN on GPUs)."""
        return self._conv2d(x, w, bias, stride, padding)

    def conv2d_backward(self, G: Any, x: Any, w: Any, stride: tuple, padding: tuple,
                        need: tuple) -> tuple:
        """(dx, dW[, db]) for gpuflow.Conv2D (None where `need` says no), by torch's own."""
        has_bias = len(need) == 3
        mask = [need[0], need[1], has_bias and need[2]]
        dx, dW, db = self._conv_backward(G, x, w, [w.shape[0]] if has_bias else None, stride,
                                         padding, (1, 1), False, (0, 0), 1, mask)
        return (dx, dW, db)[:len(need)]

    # Optional routes declared in Ops (one kernel where the generic route makes two; the same
    # kernels torch's autograd and optimizers run).
    def matmul_add(self, x1: Any, x2: Any, x3: Any, out: Any = None) -> Any:
        """x1 @ x2 + x3 (gpuflow.Linear's value), as torch's addmm."""
        return self._addmm(x3, x1, x2, out=out)

    def subtract_scaled(self, x: Any, y: Any, alpha: float) -> Any:
        """x -= alpha * y in place (SGD's step), as torch's optimizers do it: one rounding
        where multiply-then-subtract has two (so within an ulp of that route)."""
        return x.sub_(y, alpha=alpha)

    # gpuflow.GELU, LayerNorm and the attention's softmax by torch's own kernels, the ones its
    # autograd runs (one pass where the portable route makes several; every floating dtype).
    def gelu(self, x: Any, approximate: str, out: Any = None) -> Any:
        if out is None:
            return self._aten.gelu(x, approximate=approximate)
        return self._aten.gelu.out(x, approximate=approximate, out=out)

    def gelu_backward(self, G: Any, x: Any, approximate: str, out: Any = None) -> Any:
        if out is None:
            return self._aten.gelu_backward(G, x, approximate=approximate)
        return self._aten.gelu_backward.grad_input(G, x, approximate=approximate,
                                                   grad_input=out)

    def layer_norm(self, x: Any, gamma: Any, beta: Any, eps: float, out: Any = None) -> tuple:
        shape = [x.shape[-1]]
        if out is None:
            return self._aten.native_layer_norm(x, shape, gamma, beta, eps)
        value, mean, rstd = out
        return self._aten.native_layer_norm.out(x, shape, gamma, beta, eps, out0=value,
                                                out1=mean, out2=rstd)

    def layer_norm_backward(self, G: Any, x: Any, mean: Any, rstd: Any, gamma: Any,
                            need: tuple) -> tuple:
        dx, dgamma, dbeta = self._aten.native_layer_norm_backward(
            G, x, [x.shape[-1]], mean, rstd, gamma, gamma, list(need))  # bias: its shape
        return (dx if need[0] else None, dgamma if need[1] else None,
                dbeta if need[2] else None)

    def softmax(self, x: Any, out: Any = None) -> Any:
        if out is None:
            return self._aten._softmax(x, -1, False)
        return self._aten._softmax.out(x, -1, False, out=out)

    def softmax_backward(self, G: Any, p: Any, out: Any = None) -> Any:
        if out is None:
            return self._aten._softmax_backward_data(G, p, -1, p.dtype)
        return self._aten._softmax_backward_data.out(G, p, -1, p.dtype, grad_input=out)

    def flush_subnormals(self, a: Any, largest: float, work: Any = None) -> Any:
        """a's entries with |a| <= largest set to 0 in one pass: torch's hardshrink (x where
        |x| > lambd, else 0; NaN kept), written back into a."""
        return self._aten.hardshrink.out(a, largest, out=a)

    # gpuflow.MaxPool2D / AvgPool2D by torch's own kernels, as torch's autograd calls them
    # (padding 0, dilation 1, floor mode).
    def max_pool2d(self, x: Any, size: tuple, stride: tuple) -> tuple:
        """(value, argmax): the window maxima and where they are (the first on ties)."""
        return self._aten.max_pool2d_with_indices(x, size, stride)

    def max_pool2d_backward(self, G: Any, x: Any, argmax: Any, size: tuple,
                            stride: tuple) -> Any:
        return self._aten.max_pool2d_with_indices_backward(G, x, size, stride, (0, 0), (1, 1),
                                                           False, argmax)

    def avg_pool2d(self, x: Any, size: tuple, stride: tuple) -> Any:
        return self._aten.avg_pool2d(x, size, stride)

    def avg_pool2d_backward(self, G: Any, x: Any, size: tuple, stride: tuple) -> Any:
        return self._aten.avg_pool2d_backward(G, x, size, stride, (0, 0), False, True, None)


class TorchDevice(Device):
    """One torch device (the CPU or one CUDA GPU)."""

    backend = "torch"

    def __init__(self, name: str, xp: Any, native: Any) -> None:
        import torch
        super().__init__(name, xp, native)
        self._torch = torch
        self.is_gpu = native.type == "cuda"
        self.is_host = not self.is_gpu
        self.index = native.index

    def _make_ops(self) -> Ops:
        return TorchOps(self.xp)

    def new_buffer(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self._torch.empty(shape, dtype=dtype, device=self.native)

    def memory_keys(self, value: Any) -> tuple:
        # The storage's address: shared by views, .detach(), .data and torch.as_tensor of
        # the tensor's .numpy(), none of which is an object gpuflow made.
        return (value.untyped_storage().data_ptr(),)

    def owns(self, value: Any) -> bool:
        return isinstance(value, self._torch.Tensor) and value.device == self.native

    def scope(self) -> Any:
        return self._torch.cuda.device(self.native) if self.is_gpu else super().scope()

    def describe(self) -> str:
        torch = self._torch
        if not self.is_gpu:
            return f"PyTorch {torch.__version__} on the CPU ({torch.get_num_threads()} threads)"
        props = torch.cuda.get_device_properties(self.native)
        return (f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}), GPU "
                f"{self.native.index}: {props.name}, {props.total_memory / 2**30:.1f} GiB")

    def rng(self, seed: int) -> "_TorchRng":
        return _TorchRng(seed, self)

    def _put(self, host: Any, dtype: Any) -> Any:
        return self._torch.as_tensor(host, dtype=dtype, device=self.native)

    def _to_host(self, value: Any) -> Any:
        if value.dtype == self._torch.bfloat16:  # NumPy has no bfloat16: exact in float32
            value = value.float()
        host = value.detach().to("cpu").numpy()
        return host.copy() if value.device.type == "cpu" else host  # never the live tensor

    def _synchronize(self) -> None:
        self._torch.cuda.synchronize(self.native)

    def profile_clock(self) -> Any:
        return _TorchEvents(self) if self.is_gpu else super().profile_clock()


class _TorchEvents:
    """`profile_clock()` on a CUDA device: torch.cuda.Event(enable_timing=True) recorded on the
    current stream (a mark waits for nothing; `wait()` synchronises once, before `seconds`)."""

    kind = "CUDA events (torch.cuda.Event)"

    def __init__(self, device: TorchDevice) -> None:
        self._event, self._sync = device._torch.cuda.Event, device._synchronize

    def mark(self, results: Any = None) -> Any:
        event = self._event(enable_timing=True)
        event.record()
        return event

    def wait(self) -> None:
        self._sync()

    @staticmethod
    def seconds(start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3


class _TorchRng:
    """A torch.Generator on the device: `uniform(shape, dtype, out=None)` in [0, 1) there, with
    no host round trip. CPU and CUDA generators give different numbers for the same seed."""

    def __init__(self, seed: int, device: TorchDevice) -> None:
        torch = device._torch
        self._generator = torch.Generator(device=device.native).manual_seed(seed)
        self._rand, self._native = torch.rand, device.native

    def uniform(self, shape: tuple[int, ...], dtype: Any, out: Any = None) -> Any:
        """Uniform numbers in [0, 1) of `shape` and `dtype`, into `out` if given."""
        if out is not None:
            return self._rand(tuple(shape), generator=self._generator, out=out)
        return self._rand(tuple(shape), generator=self._generator, dtype=dtype,
                          device=self._native)


def make_device(rest: str, spec: str) -> TorchDevice:
    """'torch' / 'torch:cpu', 'torch:cuda', 'torch:cuda:N'."""
    import array_api_compat.torch as xp
    import torch
    kind, _, index = rest.lower().partition(":")
    if kind in ("", "cpu") and not index:
        return TorchDevice("torch:cpu", xp, torch.device("cpu"))
    if kind != "cuda":
        raise DeviceError(f"unknown device spec {spec!r}.\n"
                          "help: pass 'torch:cpu', 'torch:cuda' or 'torch:cuda:N'.")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"no CUDA device found for {spec!r}: PyTorch {torch.__version__} "
                          f"(CUDA build: {torch.version.cuda or 'no, a CPU-only build'}) sees "
                          "no GPU."
                          "\nhelp: pass 'torch:cpu' or 'cpu', or install a CUDA build of torch "
                          "on a machine with an NVIDIA GPU.")
    try:
        n = int(index) if index else 0
    except ValueError:
        raise DeviceError(f"unknown device spec {spec!r}: the GPU index must be an integer.\n"
                          "help: pass 'torch:cuda:0'.") from None
    if not 0 <= n < count:
        raise DeviceError(f"no CUDA device {n} for {spec!r}: torch sees {count} GPU(s).\n"
                          f"help: pass one of torch:cuda:0 .. torch:cuda:{count - 1}.")
    return TorchDevice(f"torch:cuda:{n}", xp, torch.device("cuda", n))


def rank_spec(rest: str, spec: str, local_rank: int) -> str | None:
    """'torch:cuda' -> 'torch:cuda:<local rank modulo the GPUs torch sees>'."""
    if rest.lower() != "cuda":
        return None
    import torch
    return f"{spec}:{local_rank % max(1, torch.cuda.device_count())}"


def candidate_specs() -> list[str]:
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["torch:cpu"] + ([f"torch:cuda:{i}" for i in range(count)] or ["torch:cuda:0"])


def array_device_name(value: Any) -> str | None:
    """'torch:cpu' or 'torch:cuda:N' for a tensor, None for anything else."""
    import torch
    if not isinstance(value, torch.Tensor):
        return None
    d = value.device
    return "torch:cpu" if d.type == "cpu" else f"torch:{d.type}:{d.index or 0}"
