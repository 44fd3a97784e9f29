"""ct_fast: circuit-tuning (fine-tuning as subgraph search) on unmodified Hugging Face causal LMs."""
from .errors import CTFastError, NonFiniteError, UnsupportedArchitectureError
from .graph import ComputationGraph, ParamSlice

__version__ = "0.1.0"
from .attribution import AttributionRun, EdgeScores, attribute, logit_diff, logprob_diff
from .circuit import Circuit, ParamSelection, TopNSchedule, select_circuit
from .optim import CircuitAdamW, CircuitSGD
from .tuner import CircuitTuner, StepResult
from .fused_loss import causal_lm_loss, linear_cross_entropy
from .models import enable_activation_checkpointing, load_model
from .memory import MemoryPlan, memory_plan
from .state_interchange import install_torch_guard as _install_torch_guard

_install_torch_guard()  # a torch optimizer handed a circuit state_dict refuses to step instead of misreading it

__all__ = [
    "AttributionRun", "Circuit", "CircuitAdamW", "CircuitSGD", "CircuitTuner", "ComputationGraph", "CTFastError",
    "EdgeScores", "MemoryPlan", "NonFiniteError", "ParamSelection", "ParamSlice", "StepResult", "TopNSchedule",
    "UnsupportedArchitectureError", "attribute", "causal_lm_loss", "enable_activation_checkpointing",
    "linear_cross_entropy", "load_model", "logit_diff", "logprob_diff", "memory_plan", "select_circuit",
]
