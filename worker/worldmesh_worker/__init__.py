"""worldmesh's data plane: stage workers wired by per-pair worlds."""

__version__ = "0.1.0"
