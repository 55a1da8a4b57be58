"""gpuflow: MiniFlow's graph of nodes, on NumPy, CuPy, PyTorch or any array-API library.

    from gpuflow import *
    X, W, b = Input(), Input(), Input()
    graph = topological_sort({X: x, W: w, b: b0}, device="cpu")   # or "cuda", "auto", ...

`import gpuflow` never imports CuPy or torch: a backend is loaded when its device is asked for.
"""

from .backends import Device, LEDGER, available_devices, get_device
from .backends.numpy_threads import get_num_threads, set_num_threads
from .gradcheck import GradientCheckError, gradient_check
from .errors import (CheckpointError, DataError, DeviceError, DistributedError, GpuflowError,
                     GraphError, TransferError)
from .nodes.activations import ReLU, Sigmoid, Softmax, Tanh
from .nodes.conv import AvgPool2D, Conv2D, Flatten, MaxPool2D
from .generate import generate
from .graph import Graph, SortedGraph, forward_and_backward, forward_pass, topological_sort
from .host import to_numpy
from .layers import (Parameter, attention, batchnorm, conv2d, dense, embedding, layernorm,
                     lstm, mlp, transformer_block)
from .nodes.losses import MSE, SoftmaxCrossEntropy
from .nodes import Add, Input, Linear, Node
from .nodes.norm import BatchNorm, Dropout, LayerNorm
from .nodes.recurrent import LSTM
from .nodes.sequence import (GELU, BiasAdd, Concat, Embedding, MatMul, Mul, Reshape, Scale,
                       ScaledDotProductAttention, SiLU, Slice, Transpose)
from .optim import sgd_update
from .runtime.recomputation import recompute

from .version import __version__  # noqa: F401

__all__ = [
    "Node", "Input", "Linear", "Sigmoid", "ReLU", "Tanh", "MSE", "SoftmaxCrossEntropy",
    "topological_sort", "forward_pass", "forward_and_backward", "sgd_update",
    "get_device", "available_devices", "Device", "DeviceError", "GraphError",
    "Graph", "Parameter", "dense", "mlp", "gradient_check",
    "Conv2D", "MaxPool2D", "AvgPool2D", "Flatten", "Dropout", "BatchNorm", "LayerNorm",
    "Softmax", "Add", "conv2d", "batchnorm", "layernorm", "to_numpy",
    "Embedding", "MatMul", "Mul", "Scale", "Reshape", "Transpose", "Concat", "Slice", "GELU",
    "SiLU", "ScaledDotProductAttention", "LSTM", "BiasAdd", "embedding", "lstm", "attention",
    "recompute", "transformer_block", "generate",
]

from . import distributed  # noqa: E402 - after the core it builds on; never imports mpi4py
from . import export  # noqa: E402 - gpuflow.export.to_onnx / to_python; imports onnx only when used
