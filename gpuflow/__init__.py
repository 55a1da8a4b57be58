"""gpuflow: MiniFlow graphs on any array-API backend."""
