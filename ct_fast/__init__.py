"""ct_fast: circuit-tuning (fine-tuning as subgraph search) on unmodified Hugging Face causal LMs."""
from .errors import CTFastError, NonFiniteError, UnsupportedArchitectureError
from .graph import ComputationGraph, ParamSlice

__version__ = "0.1.0"
