"""visrep: visual representation learning (I-JEPA and its family) in one codebase."""
__version__ = "0.1.0"
