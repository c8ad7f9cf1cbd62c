"""declab: an interactive decoding-strategy lab (engine, model registry, trace, runner, CLI)."""

__version__ = "0.1.0"
