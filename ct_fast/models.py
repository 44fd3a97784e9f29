"""Loading models: ``from_pretrained`` on a hub name (when online) or a local directory (always)."""

from __future__ import annotations

import os

import torch

from .errors import CTFastError
from .graph import ComputationGraph

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load_model(name_or_path: str, dtype=None, device=None, mlp_head_dim: int | None = None):
    """Load a supported causal LM and its graph: ``(model, graph)``.

    ``name_or_path``: a local directory written by ``save_pretrained``, or a hub name (needs network or a
    filled cache). ``dtype``: a torch dtype or one of ``DTYPES``. Raises ``CTFastError`` for a missing
    path or an unsupported architecture before any training starts.

    Example::

        model, graph = load_model("./my-llama", dtype="bf16", device="cuda")
    """
    from transformers import AutoModelForCausalLM

    looks_local = os.path.sep in name_or_path or name_or_path.startswith(".") or os.path.isabs(name_or_path)
    if looks_local and not os.path.isdir(name_or_path):
        raise CTFastError(f"model path {name_or_path!r} does not exist; pass a directory written by "
                          "save_pretrained, or a hub name")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CTFastError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    except OSError as e:
        raise CTFastError(f"could not load model {name_or_path!r}: {e}. Without network, pass a local "
                          "directory written by save_pretrained") from e
    except ValueError as e:  # e.g. a config of an architecture without a causal-LM class
        raise CTFastError(f"could not load {name_or_path!r} as a causal LM: {e}") from e
    graph = ComputationGraph.from_model(model, mlp_head_dim=mlp_head_dim)
    if device is not None:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise CTFastError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        model = model.to(device)
    return model, graph


def enable_activation_checkpointing(model):
    """Activation checkpointing that attribution supports (non-reentrant: the taps and masked linears stay in
    the graph the backward runs; scores equal the non-checkpointed run)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


def shape_config(name: str):
    """The transformers config of a named model shape (random weights; used by the benchmarks and the memory plan):
    ``tiny``, ``gpt2-small``, ``llama-1B`` (Llama-3.2-1B) or ``llama-8B`` (Llama-3-8B)."""
    import transformers as tf

    if name == "tiny":
        return tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    if name == "gpt2-small":
        return tf.GPT2Config()
    if name == "llama-1B":  # Llama-3.2-1B shape
        return tf.LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                              head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                              max_position_embeddings=8192)
    if name == "llama-8B":  # Llama-3-8B shape
        return tf.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192)
    raise ValueError(f"unknown model {name!r}: tiny, gpt2-small, llama-1B, llama-8B")
