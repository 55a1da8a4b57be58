"""The runtime under the nodes: the plan that binds and orders them (plan.py), where a graph
runs (placement.py) and the recomputed segments (recomputation.py). Imported by path
(`gpuflow.runtime.plan`, ...); this package itself imports nothing."""
