"""The runtime under the nodes: the plan that binds and orders them (plan.py), the kept
buffers they write into (buffers.py), mixed precision's masters and loss scale (amp.py), where
a graph runs (placement.py) and the recomputed segments (recomputation.py). Imported by path
(`gpuflow.runtime.plan`, ...); this package itself imports nothing."""
