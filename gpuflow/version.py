"""gpuflow's version, in a module of its own so that the package's own modules can read it."""

__version__ = "0.1.0"
