"""Op dispatch: one name per op, through every backend.

``CT_FAST_BACKEND=auto|cuda|triton|cpp|torch`` (default ``auto``):

- ``cuda`` / ``cpp``: the native kernels of ``ct_fast._C`` (CUDA, or C++ with OpenMP on CPU), reached
  through ``torch.ops.ct_fast.*``;
- ``triton``: the Triton kernels of ``ct_fast.kernels`` (GPU; on CPU only under ``TRITON_INTERPRET=1``);
- ``torch``: the pure-torch reference (``ct_fast.ops.reference``), the oracle of every test;
- ``auto``: per call, the first of cuda > triton > cpp > torch that has the op for the tensors' device and
  their dtype. A fallback is logged once per (op, reason). On a GPU of the architecture the
  committed GPU timings were measured on, an (op, dtype) they cover runs the measured order instead
  (``ct_fast.ops.measured``: a kernel joins only where it beat the torch path).

An explicitly requested backend that cannot run a call (not built, wrong device, unsupported dtype) raises
``CTFastError`` with the reason; ops that the backend does not implement at all (``masked_weight_grad`` in
C++/CUDA: GEMMs on gathered operands; ``masked_bias_grad`` everywhere) run their torch implementation.

The optimizer ops take ``lr`` as a float or a one-element tensor on the parameters' device, and an optional
``found_inf`` flag tensor (see ``ct_fast.ops.library``): with both, a masked step reads no host value and
makes no host-to-device copy, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re

import torch

from ..errors import CTFastError
from . import gemm, library, measured, reference
from .reference import adamw_rows_, heads_to_residual, norm_vjp_, sgd_rows_  # noqa: F401

log = logging.getLogger("ct_fast")
BACKENDS = ("cuda", "triton", "cpp", "torch")
NATIVE_OPS = {"score_edges", "masked_adamw_", "masked_sgd_"}  # ops with C++/CUDA kernels in ct_fast._C
# auto skips these (op, backend) pairs (explicitly requesting the backend still runs them):
# - score_edges in C++: measured 4x slower than the MKL-GEMM torch path on the 2-core CPU (6.4 s vs 1.6 s per
#   GPT-2-small step, `ct-fast profile`);
# - score_edges in CUDA / Triton: correct (CUDA compiled; Triton, with tensor-core dots for bf16/fp16, tested
#   under the interpreter in fp32/bf16/fp16) but not yet timed on a GPU against the cuBLAS torch path; they join
#   auto once bench/bench_score_edges.py (its per-backend op rows) shows them faster there.
# - masked_weight_grad in Triton: one GEMM that gathers the selected features inside its loads (no index_select
#   copies); tested under the interpreter, not yet timed on a GPU against gather + cuBLAS (the torch path). It
#   joins auto once committed results of bench/bench_masked_dw.py show it faster there.
# - masked_sgd_ in Triton: tested under the interpreter, not timed on a GPU (auto on a GPU takes the CUDA kernel
#   when built, else the torch path).
# - residual_grads in Triton: the residual gradients through the norm, written once in the scoring dtype; on a GPU
#   the committed timings decide (gpu_choices.json).
# On a GPU, committed timings override these defaults per (op, dtype): see ct_fast.ops.measured.
AUTO_SKIP = {("score_edges", "cpp"), ("score_edges", "cuda"), ("score_edges", "triton"),
             ("masked_weight_grad", "triton"), ("masked_sgd_", "triton"), ("residual_grads", "triton")}
TRITON_OPS = {"score_edges", "masked_adamw_", "masked_sgd_", "masked_weight_grad",  # kernels in ct_fast.kernels
              "residual_grads"}
FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
# the oldest Triton every kernel compiles with (bench/triton_sm90.py, sm_90: 3.3 to 3.9; 3.2's compiler API differs)
MIN_TRITON = (3, 3)
RESIDUAL_KERNEL_WIDTH = 512  # widest head the Triton residual_grads takes (it re-reads the rows per d_model block)
_native = None
_native_error = None
_logged: set = set()
_image_errors: dict = {}  # torch.device -> why the CUDA kernels cannot run there (None: they can)


def requested_backend() -> str:
    """The backend named by ``CT_FAST_BACKEND`` (``auto`` if unset)."""
    name = os.environ.get("CT_FAST_BACKEND", "auto").strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise CTFastError(f"CT_FAST_BACKEND={name!r} is not one of auto, {', '.join(BACKENDS)}")
    return name


def native():
    """``ct_fast._C`` if it was built (loaded lazily, once), else None (``native_error()`` says why)."""
    global _native, _native_error
    if _native is None and _native_error is None:
        try:
            from .. import _C  # noqa: F401 - registers the native kernels with torch.ops.ct_fast
            _native = _C
        except (ImportError, RuntimeError, OSError) as e:  # not built, or stale: kernel signatures do not match
            _native_error = (f"ct_fast._C is not built or does not load ({e}); (re)build it with "
                             "`pip install --no-build-isolation --no-deps -e .` (CT_FAST_SKIP_NATIVE unset, ninja "
                             "installed)")
    return _native


def native_error() -> str | None:
    native()
    return _native_error


@functools.cache
def _triton_missing() -> str | None:
    """Why the installed Triton cannot run the kernels (not installed, too old), or None; asked once."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) < MIN_TRITON:
        return (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest the kernels "
                "are compiled with (bench/triton_sm90.py); pip install -U triton")
    return None


def triton_available(device: torch.device) -> str | None:
    """None if Triton kernels can run on ``device``, else the reason."""
    missing = _triton_missing()
    if missing:
        return missing
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1), got {device.type}"


def _reason(backend: str, op: str, device: torch.device, dtypes) -> str | None:
    """None if ``backend`` can run ``op`` on these tensors, else why not."""
    if backend == "torch":
        return None
    if any(d not in FLOAT_TYPES for d in dtypes):
        return f"dtype {[d for d in dtypes if d not in FLOAT_TYPES][0]} is not float32/bfloat16/float16"
    if backend == "triton":
        if op not in TRITON_OPS:
            return f"no Triton kernel for {op}"
        return triton_available(device)
    if op not in NATIVE_OPS:
        return f"no native kernel for {op}"
    mod = native()
    if mod is None:
        return native_error()
    if backend == "cpp" and device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {device.type}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device.type}"
        if not getattr(mod, "WITH_CUDA", False):
            return "ct_fast._C was built without CUDA"
        return _cuda_image_error(mod, device)
    return None


def _cuda_image_error(mod, device: torch.device) -> str | None:
    """Why ``ct_fast._C``'s CUDA kernels cannot run on ``device`` (built for other architectures), or None; asked of
    the build once per device."""
    if device in _image_errors:
        return _image_errors[device]
    index = torch.cuda.current_device() if device.index is None else device.index
    check = getattr(mod, "cuda_image_error", None)  # absent from builds before it: launched unchecked, as then
    err = check(index) if check is not None else ""
    why = None
    if err:
        major, minor = torch.cuda.get_device_capability(index)
        why = (f"ct_fast._C holds no CUDA kernels for this GPU (sm_{major}{minor}: {err}); rebuild it for the GPU: "
               f"TORCH_CUDA_ARCH_LIST={major}.{minor} pip install --no-build-isolation --no-deps -e .")
    if device.index is not None:
        _image_errors[device] = why
    return why


def choose_backend(op: str, device: torch.device, dtypes=()) -> str:
    """The backend that runs ``op`` for tensors on ``device`` (see module docstring)."""
    req = requested_backend()
    if req != "auto":
        if (req == "triton" and op not in TRITON_OPS) or (req in ("cpp", "cuda") and op not in NATIVE_OPS):
            return "torch"  # this op's only implementation is the composite torch one (e.g. GEMMs on gathers)
        why = _reason(req, op, device, dtypes)
        if why:
            raise CTFastError(f"CT_FAST_BACKEND={req} cannot run {op}: {why}")
        return req
    measured_order = measured.gpu_order(op, dtypes, device) if device.type == "cuda" else None
    if measured_order is not None:
        candidates = measured_order
    else:
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
        candidates = [b for b in order if (op, b) not in AUTO_SKIP]
    for b in candidates:
        why = _reason(b, op, device, dtypes)
        if why is None:
            return b
        key = (op, b, why)
        if key not in _logged and (b != "triton" or device.type == "cuda"):
            _logged.add(key)
            log.info("ct_fast: %s: not using %s (%s)", op, b, why)
    return "torch"


def _call(op: str, backend: str, *args):
    if backend == "torch":
        return library.DEFAULTS[op](*args)
    if backend == "triton":
        from .. import kernels
        with _on(_device_of(args)):
            return getattr(kernels, op)(*args)
    return getattr(torch.ops.ct_fast, op)(*args)


def _on(device: torch.device | None):
    """Make ``device`` current for a Triton launch: Triton launches on torch's current GPU and stream, which need
    not be the tensors' (a model on cuda:1 driven from a thread whose current GPU is cuda:0); the native CUDA ops
    guard themselves. Nothing to do (no context entered) where it is current already."""
    if device is None or device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _device_of(args) -> torch.device | None:
    """The device of the first tensor in ``args`` (tensors, or lists of them)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t.device
    return None


# ---- public ops ------------------------------------------------------------------------------------

def score_edges(delta: torch.Tensor, up_weight, grad_down: torch.Tensor) -> torch.Tensor:
    """Signed edge scores of one block (see ``reference.score_edges``), fp32 ``[n_u, n_d]``. The Triton kernel
    takes heads up to ``kernels.score_edges.max_head_width`` (128 in bf16/fp16, 64 in fp32); wider ones (an
    unsplit MLP) run the torch path."""
    b = choose_backend("score_edges", delta.device, (delta.dtype, grad_down.dtype))
    if b == "triton" and not _score_kernel_takes(up_weight, grad_down.dtype):
        b = "torch"
    return _call("score_edges", b, _delta_rows(delta, up_weight, grad_down), up_weight, grad_down)


def _delta_rows(delta: torch.Tensor, up_weight, grad_down: torch.Tensor) -> torch.Tensor:
    """``delta`` as the kernels read it, rows ``[c, n_u * w]`` (``[c, d]`` for a residual vector), from that or
    per head ``[n_u, c, w]``; a shape that does not match ``up_weight [n_u, w, d]`` and ``grad_down [n_d, c, d]``
    is refused (the kernels index by these sizes unchecked)."""
    if grad_down.dim() != 3:
        raise CTFastError(f"score_edges: grad_down must be [n_d, c, d], got {tuple(grad_down.shape)}")
    _, c, d = grad_down.shape
    n_u, w = (1, d) if up_weight is None else up_weight.shape[:2]
    if up_weight is not None and (up_weight.dim() != 3 or up_weight.shape[2] != d):
        raise CTFastError(f"score_edges: up_weight must be [n_u, w, {d}], got {tuple(up_weight.shape)}")
    if delta.dim() == 3 and tuple(delta.shape) == (n_u, c, w):  # per head: the kernels take rows
        delta = delta.transpose(0, 1).reshape(c, n_u * w)
    if tuple(delta.shape) != (c, n_u * w):
        raise CTFastError(f"score_edges: delta must be [{c}, {n_u * w}] (or per head [{n_u}, {c}, {w}]) for "
                          f"up_weight {None if up_weight is None else tuple(up_weight.shape)} and grad_down "
                          f"{tuple(grad_down.shape)}, got {tuple(delta.shape)}")
    return delta


def _score_kernel_takes(up_weight, dtype: torch.dtype) -> bool:
    """Whether the Triton scoring kernel takes this group's heads (``kernels.score_edges.max_head_width``)."""
    from ..kernels.score_edges import max_head_width

    return up_weight is None or up_weight.shape[1] <= max_head_width(dtype)


def score_edges_into(out: torch.Tensor, sources, grad_down: torch.Tensor, alpha: float = 1.0,
                     workspace: torch.Tensor | None = None, split: int = 1) -> torch.Tensor:
    """``out += alpha * score_edges(delta_i, W_i, grad_down)`` stacked by rows over ``sources`` (a list of
    ``(delta_i, W_i)`` upstream groups — ``delta_i`` rows ``[c, n_i * w]`` or per head ``[n_i, c, w]`` —, ``out`` fp32
    ``[sum n_u_i, n_d]``, any strides): one layer's gradient block scored against many upstream groups at once.

    - Triton: a scoring kernel per group and one reduction into ``out`` (``len(sources) + 1`` launches);
    - torch: every group's contributions written into one ``[sum n_u_i, c, d]`` block (``workspace``: a buffer of
      at least that many elements in ``grad_down``'s dtype, else allocated), then one GEMM with ``grad_down`` —
      G is read once for all the groups, not once per group; ``split`` > 1 dividing the token count: that GEMM (K =
      ``c * d``) split explicitly over ``split`` token blocks, one bmm and one sum (``measured.product_split``);
    - cpp/cuda, and heads too wide for the Triton kernel: ``score_edges`` + ``add_`` per group."""
    rows = sum(1 if w is None else w.shape[0] for _, w in sources)
    if rows != out.shape[0]:  # before anything is written
        raise CTFastError(f"score_edges_into: the sources score {rows} rows, out has {out.shape[0]}")
    b = choose_backend("score_edges", grad_down.device, (grad_down.dtype,))
    if b == "torch":
        n_d, c, d = grad_down.shape
        size = rows * c * d
        if workspace is None or workspace.numel() < size:
            workspace = torch.empty(size, dtype=grad_down.dtype, device=grad_down.device)
        A, r = workspace[:size].view(rows, c, d), 0
        for delta, up_weight in sources:
            n = 1 if up_weight is None else up_weight.shape[0]
            heads_to_residual(delta, up_weight, out=A[r:r + n], dtype=grad_down.dtype)
            r += n
        if split > 1 and c % split == 0:  # [split, rows, n_d] partial products, summed in fp32
            return out.add_(gemm.split_mm(A.view(rows, split, -1), grad_down.reshape(n_d, split, -1)), alpha=alpha)
        # added in fp32 straight from the GEMM's output dtype (the same values as a .float() copy, one launch less);
        # the [rows, n_d] product lands in 16-byte aligned rows on a GPU (gemm.mm: n_d is any node count)
        return out.add_(gemm.mm(A.view(rows, -1), grad_down.reshape(n_d, -1).t()), alpha=alpha)
    fused, r = [], 0
    for delta, up_weight in sources:
        n = 1 if up_weight is None else up_weight.shape[0]
        delta = _delta_rows(delta, up_weight, grad_down)
        if b == "triton" and _score_kernel_takes(up_weight, grad_down.dtype):
            fused.append((r, n, delta, up_weight))
        else:
            out[r:r + n].add_(_call("score_edges", "torch" if b == "triton" else b, delta, up_weight, grad_down),
                              alpha=alpha)
        r += n
    if fused:  # runs of consecutive kernel-sized groups: one call (and one reduction) each
        from .. import kernels

        runs = [[fused[0]]]
        for item in fused[1:]:
            prev = runs[-1][-1]
            if item[0] == prev[0] + prev[1]:
                runs[-1].append(item)
            else:
                runs.append([item])
        with _on(out.device):
            for run in runs:
                first, last = run[0][0], run[-1][0] + run[-1][1]
                kernels.score_edges_into(out[first:last], [(d, w) for _, _, d, w in run], grad_down, alpha)
    return out


def _token_sums(out: torch.Tensor, sums: torch.Tensor | None) -> torch.Tensor:
    """``sums [n, d] = out.sum(1)`` in fp32 (when asked for)."""
    if sums is not None:
        torch.sum(out, 1, dtype=torch.float32, out=sums)
    return out


def residual_grads(terms, out: torch.Tensor, norm=None, x=None, stats=None, sums=None) -> torch.Tensor:
    """Residual-space gradients of one block of downstream nodes through their norm, into ``out [n, c, d]`` (see
    ``reference.residual_grads``). The Triton kernels (the norm's reductions, then the gradients) write ``out`` once
    in its dtype (no fp32 block); they cover one or two projections per block, head-sized widths
    (<= ``RESIDUAL_KERNEL_WIDTH``: a whole MLP node is one wide GEMM, cuBLAS's job) and LayerNorm/RMSNorm/no norm;
    other cases run the torch composite. ``stats``: the norm's ``reference.norm_stats`` at ``x``, when the caller has
    them. ``sums``: fp32 ``[n, d]`` set to ``out.sum(1)`` — by the kernel from its tiles (no second read of
    ``out``), else by a sum."""
    b = choose_backend("residual_grads", out.device, (out.dtype,))
    kind = "none" if norm is None else reference.norm_kind(norm)
    wide = any(w is not None and w.shape[1] > RESIDUAL_KERNEL_WIDTH for _, w in terms)
    if b != "triton" or kind == "generic" or not 1 <= len(terms) <= 2 or wide or not _dense(out, sums):
        if kind in ("rmsnorm", "layernorm") and all(w is None or w.dtype == out.dtype for _, w in terms):
            return _token_sums(reference.residual_grads_scaled(terms, out, norm, x, stats), sums)
        return _token_sums(reference.residual_grads(terms, out, norm, x), sums)
    from .. import kernels

    mean, rstd, gamma = (stats or reference.norm_stats(norm, x)) if norm is not None else (None, None, None)
    with _on(out.device):
        return kernels.residual_grads(terms, out, x, (mean, rstd), gamma, kind, sums=sums)


def _dense(*tensors) -> bool:
    """Whether the given tensors (None skipped) are contiguous: the Triton residual kernels write them by offsets."""
    return all(t is None or t.is_contiguous() for t in tensors)


def residual_grads_blocks(blocks, out: torch.Tensor, norm=None, x=None, stats=None, sums=None) -> torch.Tensor:
    """``residual_grads`` of consecutive node blocks read through one norm, one projection each (a layer's query,
    key and value heads): ``blocks`` a list of ``(rows [c, n_b * w], heads_weight [n_b, w, d])`` filling ``out``'s
    nodes in order. The Triton kernel takes up to three blocks a launch (heads of one width and weight layout);
    otherwise one ``residual_grads`` per block."""
    b = choose_backend("residual_grads", out.device, (out.dtype,))
    kind = "none" if norm is None else reference.norm_kind(norm)
    layout = {(w.shape[1:], w.stride()) for _, w in blocks if w is not None}
    if (b != "triton" or kind == "generic" or len(layout) != 1 or any(w is None for _, w in blocks)
            or blocks[0][1].shape[1] > RESIDUAL_KERNEL_WIDTH or not _dense(out, sums)):
        first = 0
        for rows, w in blocks:
            n = 1 if w is None else w.shape[0]
            residual_grads([(rows, w)], out[first:first + n], norm, x, stats,
                           None if sums is None else sums[first:first + n])
            first += n
        return out
    from .. import kernels

    mean, rstd, gamma = (stats or reference.norm_stats(norm, x)) if norm is not None else (None, None, None)
    with _on(out.device):
        return kernels.residual_grads_blocks(blocks, out, x, (mean, rstd), gamma, kind, sums=sums)


def masked_weight_grad(x, grad_out, index, out_features: bool) -> torch.Tensor:
    """Compact weight gradient of selected features (see ``reference.masked_weight_grad``)."""
    b = choose_backend("masked_weight_grad", x.device, (x.dtype, grad_out.dtype))
    if b == "torch" and index is not None:  # gather an aligned count of features on a GPU (see ops.gemm)
        padded = gemm.padded_index(index, x.dtype)
        if padded is not index:
            return _call("masked_weight_grad", b, x, grad_out, padded, out_features)[:index.numel()]
    return _call("masked_weight_grad", b, x, grad_out, index, out_features)


def masked_bias_grad(grad_out, index) -> torch.Tensor:
    b = choose_backend("masked_bias_grad", grad_out.device, (grad_out.dtype,))
    return _call("masked_bias_grad", b, grad_out, index)


def _device_scalar(lr, device: torch.device):
    """``(float lr, lr_tensor or None)``: a tensor on ``device`` stays there (fp32, 0-dim: the kernels read it, no
    sync); a CPU tensor for GPU parameters is read on the host (no device wait); a number is a float."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    if lr.numel() != 1:
        raise CTFastError(f"lr must be a number or a one-element tensor, got a tensor of shape {tuple(lr.shape)}")
    if lr.device != device:
        if lr.device.type == "cpu":
            return float(lr), None
        raise CTFastError(f"lr is on {lr.device} but the parameters are on {device}")
    return 0.0, lr.detach().reshape(()).to(torch.float32)


def _check_flag(found_inf, device: torch.device):
    if found_inf is not None and (found_inf.numel() != 1 or found_inf.dtype != torch.float32
                                  or found_inf.device != device):
        raise CTFastError(f"found_inf must be a one-element float32 tensor on {device}, got "
                          f"{found_inf.dtype} {tuple(found_inf.shape)} on {found_inf.device}")


def _rows_layout(op: str, params, grads, steps, rows, slots, states: dict) -> tuple[list, list, list]:
    """The checks every backend relies on (the kernels trust them): one entry per parameter in each list
    (``states``: ``{name: list}``, each empty or complete), and ``(grads, rows, slots)`` in the kernels' layout —
    fp32 contiguous gradients, contiguous int64 rows and slots (copies only where a caller's are not). Index
    *values* are not read here (that would sync a GPU): the torch and cpp backends check their range, the CUDA
    and Triton kernels trust them."""
    n = len(params)
    lengths = {"grads": len(grads), "steps": len(steps), "rows": len(rows), "slots": len(slots),
               **{k: len(v) for k, v in states.items() if len(v)}}
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise CTFastError(f"{op}: {n} params but {bad}: every list holds one entry per parameter")
    for name, states_of in states.items():
        for p, x in zip(params, states_of):
            if x.dim() != 2 or x.shape[1] != p.shape[-1]:
                raise CTFastError(f"{op}: {name} must be [capacity, M] with each parameter's row width M, got "
                                  f"{tuple(x.shape)} for a parameter of {tuple(p.shape)}")
    for r, s in zip(rows, slots):
        if r.dtype != torch.long or s.dtype != torch.long or r.dim() != 1 or r.shape != s.shape:
            raise CTFastError(f"{op}: rows and slots must be int64 [k] of equal length per parameter, got "
                              f"{r.dtype} {tuple(r.shape)} and {s.dtype} {tuple(s.shape)}")
    grads = [g if g.dtype == torch.float32 and g.is_contiguous() else g.float().contiguous() for g in grads]
    rows = [r if r.is_contiguous() else r.contiguous() for r in rows]
    slots = [s if s.is_contiguous() else s.contiguous() for s in slots]
    return grads, rows, slots


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows, slots, lr, beta1, beta2, eps,
                  weight_decay, maximize, found_inf=None):
    """AdamW on the selected rows of many parameters in one call (layout: ``ct_fast.ops.library``).

    ``lr``: a float or a one-element tensor on the parameters' device (read by the kernel: no sync).
    ``found_inf``: optional one-element fp32 tensor on that device, the skip flag: set to 1 when a selected
    gradient is non-finite; while it is non-zero the step writes nothing (see ``ct_fast.ops.library``)."""
    if not params:
        return
    device = params[0].device
    lr_f, lr_t = _device_scalar(lr, device)
    _check_flag(found_inf, device)
    grads, rows, slots = _rows_layout("masked_adamw_", params, grads, steps, rows, slots, {
        "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "max_exp_avg_sqs": max_exp_avg_sqs})
    if len(exp_avgs) != len(params) or len(exp_avg_sqs) != len(params):
        raise CTFastError("masked_adamw_: exp_avgs and exp_avg_sqs need one state per parameter")
    if max_exp_avg_sqs:  # amsgrad: the reference only
        if requested_backend() not in ("auto", "torch"):
            raise CTFastError(f"CT_FAST_BACKEND={requested_backend()} cannot run masked_adamw_ with amsgrad: "
                              "amsgrad runs on the torch backend only")
        b = "torch"
    else:
        b = choose_backend("masked_adamw_", device, {p.dtype for p in params})
    _call("masked_adamw_", b, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows, slots,
          lr_f, float(beta1), float(beta2), float(eps), float(weight_decay), bool(maximize), lr_t, found_inf)


def masked_sgd_(params, grads, momentum_buffers, steps, rows, slots, lr, momentum, dampening, weight_decay, nesterov,
                maximize, found_inf=None):
    """SGD (momentum) on the selected rows of many parameters in one call; ``lr`` and ``found_inf`` as for
    ``masked_adamw_``."""
    if not params:
        return
    device = params[0].device
    lr_f, lr_t = _device_scalar(lr, device)
    _check_flag(found_inf, device)
    grads, rows, slots = _rows_layout("masked_sgd_", params, grads, steps, rows, slots,
                                      {"momentum_buffers": momentum_buffers})
    b = choose_backend("masked_sgd_", device, {p.dtype for p in params})
    if float(momentum) == 0.0:
        momentum_buffers = []  # torch keeps no buffer without momentum (each backend ignores them too)
    elif not momentum_buffers:
        raise CTFastError(f"masked_sgd_: momentum={momentum} needs momentum_buffers (one [capacity, M] per parameter)")
    _call("masked_sgd_", b, params, grads, momentum_buffers, steps, rows, slots, lr_f, float(momentum),
          float(dampening), float(weight_decay), bool(nesterov), bool(maximize), lr_t, found_inf)


def nonfinite_flag_(grads, found_inf: torch.Tensor) -> None:
    """``found_inf |= any element of grads is non-finite``, on the device, no sync: run it over the gradients of
    every parameter group first, then pass the same flag to each group's ``masked_adamw_`` / ``masked_sgd_`` to
    skip the whole step (all groups or none)."""
    if not grads:
        return
    device = grads[0].device
    _check_flag(found_inf, device)
    if (requested_backend() in ("auto", "triton") and device.type == "cuda" and triton_available(device) is None
            and all(g.is_contiguous() for g in grads)):
        from .. import kernels
        with _on(device):
            kernels.nonfinite_flag_(grads, found_inf)
    else:
        library.nonfinite_flag_(grads, found_inf)


__all__ = ["BACKENDS", "choose_backend", "heads_to_residual", "masked_adamw_", "masked_bias_grad",
           "masked_sgd_", "masked_weight_grad", "native", "nonfinite_flag_", "norm_vjp_", "reference",
           "requested_backend", "residual_grads", "residual_grads_blocks", "score_edges", "score_edges_into"]
