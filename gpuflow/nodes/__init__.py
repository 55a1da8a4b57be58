"""The nodes: MiniFlow's `Node`, `Input`, `Linear` and `Add` (core.py), and their families,
one module each: activations, losses, conv (images), norm (normalisation, dropout), sequence
(embeddings, shapes, attention), recurrent (LSTM), positions. shapes.py holds the sequence
nodes' shape helpers. Each node calls `self.xp` / `self.ops`, never an array library."""

from .core import Add, Binding, Input, Linear, Node, accumulation_dtype

__all__ = ["Add", "Binding", "Input", "Linear", "Node", "accumulation_dtype"]
