"""Every op against its pure-torch reference on fresh random inputs at awkward shapes, for every backend
available here (torch always; cpp when ct_fast._C is built; triton under TRITON_INTERPRET=1), plus
torch.library.opcheck and the backend-selection rules. The CUDA kernels also run here, emulated on the CPU
(``cuda_emu``: tests/cuda_emu)."""

import functools
import os

import cuda_emu
import pytest
import torch

from ct_fast import CTFastError, ops
from ct_fast.ops import library, measured
from ct_fast.testing import assert_close, devices


@functools.cache
def _emulation_missing():
    return cuda_emu.unavailable()


def _cases(op):
    """(device, backend) pairs that can run ``op`` here: every device of ``devices()``, every backend built, and the
    CUDA kernels emulated on the CPU (``cuda_emu``: tests/cuda_emu) where g++ and the CUDA headers are."""
    out = []
    if op in cuda_emu.OPS and _emulation_missing() is None:
        out.append(pytest.param("cpu", "cuda_emu", id="cpu-cuda_emu"))
    for device in devices():
        dev = torch.device(device)
        names = ["torch"]
        if op in ops.NATIVE_OPS and ops.native() is not None:
            names.append("cpp" if device == "cpu" else "cuda")
        if op in ops.TRITON_OPS and ops.triton_available(dev) is None:
            names.append("triton")
        for b in names:
            if b == "cuda" and not getattr(ops.native(), "WITH_CUDA", False):
                continue
            marks = [pytest.mark.triton] if b == "triton" else []
            out.append(pytest.param(device, b, marks=marks, id=f"{device}-{b}"))
    return out


@pytest.fixture(autouse=True)
def _backend_env(request, monkeypatch):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend:
        _use_backend(monkeypatch, backend)


def _use_backend(monkeypatch, backend: str):
    """``CT_FAST_BACKEND=backend``; ``cuda_emu``: ops choose "cuda" for the emulated kernels' ops and reach them
    through ``_call`` (auto elsewhere)."""
    monkeypatch.setattr(ops, "choose_backend", _CHOOSE)  # (another backend's run after an emulated one)
    monkeypatch.setattr(ops, "_call", _CALL)
    if backend != "cuda_emu":
        monkeypatch.setenv("CT_FAST_BACKEND", backend)
        return
    monkeypatch.delenv("CT_FAST_BACKEND", raising=False)
    emulated = cuda_emu.load()
    monkeypatch.setattr(ops, "choose_backend", lambda op, device, dtypes=(): "cuda" if op in cuda_emu.OPS
                        else _CHOOSE(op, device, dtypes))
    monkeypatch.setattr(ops, "_call", lambda op, b, *args: getattr(emulated, op)(*args)
                        if b in ("cuda", "cuda_emu") else _CALL(op, b, *args))


_CHOOSE, _CALL = ops.choose_backend, ops._call


def _gen(seed):
    return torch.Generator().manual_seed(seed)


SCORE_SHAPES = [(1, 1, 1, 1, 1), (3, 5, 7, 13, 11), (4, 16, 9, 33, 24), (1, None, 6, 17, 10), (2, 8, 1, 2, 64),
                (3, 16, 70, 9, 20),  # 70 downstream nodes: two blocks of 64
                (2, 100, 3, 5, 16)]  # heads wider than the fp32 kernel takes (64): the op runs the torch path


@pytest.mark.parametrize("device,backend", _cases("score_edges"))
@pytest.mark.parametrize("n_u,w,n_d,c,d", SCORE_SHAPES, ids=lambda s: str(s))
def test_score_edges(device, backend, n_u, w, n_d, c, d):
    g = _gen(n_u * 100 + n_d)
    W = None if w is None else torch.randn(n_u, w, d, generator=g)
    delta = torch.randn(c, d if w is None else n_u * w, generator=g)
    G = torch.randn(n_d, c, d, generator=g)
    want = ops.reference.score_edges(delta.double(), None if W is None else W.double(), G.double())
    got = ops.score_edges(delta.to(device), None if W is None else W.to(device), G.to(device)).cpu()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # error policy for reductions: at most 2x a same-dtype torch computation (both against fp64), plus a few
    # fp32 ulps of the absolute sum the reduction runs over (summation order differs between backends)
    ref32 = ops.reference.score_edges(delta, W, G)
    magnitude = ops.reference.score_edges(delta.abs().double(), None if W is None else W.abs().double(), G.abs().double())
    tol = 2 * (ref32.double() - want).abs() + 1e-6 * magnitude
    assert ((got.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("device,backend", _cases("score_edges"))
def test_score_edges_is_deterministic(device, backend):
    """The same inputs give the same bits (many token splits, several node blocks): the kernels sum their
    per-split partials in a fixed order instead of atomic adds, so a circuit never depends on the run."""
    if backend == "cuda_emu":
        pytest.skip("the emulation runs the blocks in order: it cannot show a run-to-run difference")
    g = _gen(5)
    n_u, w, n_d, c, d = 18, 8, 20, 100, 24
    args = (torch.randn(c, n_u * w, generator=g).to(device), torch.randn(n_u, w, d, generator=g).to(device),
            torch.randn(n_d, c, d, generator=g).to(device))
    first = ops.score_edges(*args)
    assert all(torch.equal(first, ops.score_edges(*args)) for _ in range(3))


HALF_UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device,backend", _cases("score_edges"))
@pytest.mark.parametrize("n_u,w,n_d,c,d", SCORE_SHAPES + [(5, 64, 20, 70, 128), (2, 128, 3, 5, 16), (2, 200, 3, 5, 16)],
                         ids=lambda s: str(s))  # 128: Llama-3-8B's heads, the widest the half kernel takes; 200: wider
def test_score_edges_half_operands(device, backend, n_u, w, n_d, c, d, dtype):
    """bf16/fp16 operands, fp32 accumulation (tensor cores on a GPU): within the half-precision band of the fp64
    oracle — at most twice the torch path's error plus one unit roundoff of the absolute sum — and fp32 out."""
    g = _gen(n_u * 100 + n_d + 7)
    W = None if w is None else torch.randn(n_u, w, d, generator=g)
    delta = torch.randn(c, d if w is None else n_u * w, generator=g)
    G = torch.randn(n_d, c, d, generator=g)
    want = ops.reference.score_edges(delta.double(), None if W is None else W.double(), G.double())
    half = [t if t is None else t.to(dtype) for t in (delta, W, G)]
    out = torch.full((n_u, n_d), float("nan"))
    out.copy_(ops.score_edges(*[t if t is None else t.to(device) for t in half]).cpu())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = ops.reference.score_edges(*half).double()  # the torch path: same operands and roundings
    magnitude = ops.reference.score_edges(delta.abs().double(), None if W is None else W.abs().double(),
                                          G.abs().double())
    assert ((out.double() - want).abs() <= 2 * (ref - want).abs() + HALF_UNIT[dtype] * magnitude).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device,backend", _cases("score_edges"))
@pytest.mark.parametrize("c", [1, 37])
def test_score_edges_into_accumulates_a_block(device, backend, c, dtype):
    """Several upstream groups (heads of three widths, one too wide for the kernel, and a residual-vector group)
    scored against one gradient block and added, scaled, into a strided block of a larger score matrix: the block
    gets ``alpha x`` the per-group scores on top of what it held, every element outside it keeps its bits (NaN
    poison), and the same inputs give the same bits (a NaN-filled workspace for the torch path's contributions
    included)."""
    g = _gen(c + 3)
    n_d, d = 5, 24
    widths = [(3, 8), (2, 100), (1, None), (4, 16)]  # (heads, width); 100 > the fp32 kernel's 64: torch path
    sources = []
    for n, w in widths:
        W = None if w is None else torch.randn(n, w, d, generator=g).to(device, dtype)
        sources.append((torch.randn(c, d if w is None else n * w, generator=g).to(device, dtype), W))
    G = torch.randn(n_d, c, d, generator=g).to(device, dtype)
    rows = sum(n for n, _ in widths)
    start = torch.randn(rows, n_d, generator=g)
    big = torch.full((rows + 3, n_d + 4), float("nan"), device=device)
    block = big[2:2 + rows, 1:1 + n_d]  # strided: a block of a wider matrix
    block.copy_(start)
    ops.score_edges_into(block, sources, G, alpha=-0.75)
    per_group = torch.cat([ops.reference.score_edges(*[None if t is None else t.double().cpu() for t in (dl, W)],
                                                     G.double().cpu()) for dl, W in sources])
    want = start.double() - 0.75 * per_group
    magnitude = torch.cat([ops.reference.score_edges(dl.abs().double().cpu(), None if W is None else W.abs().double().cpu(),
                                                     G.abs().double().cpu()) for dl, W in sources])
    unit = 2.0 ** -20 if dtype == torch.float32 else HALF_UNIT[dtype]
    got = big.cpu()
    assert ((got[2:2 + rows, 1:1 + n_d].double() - want).abs() <= unit * (magnitude + start.abs().double())).all()
    outside = torch.ones_like(got, dtype=torch.bool)
    outside[2:2 + rows, 1:1 + n_d] = False
    assert got[outside].isnan().all()
    again = big.clone()
    again[2:2 + rows, 1:1 + n_d].copy_(start)
    workspace = torch.full((rows * c * d + 5,), float("nan"), dtype=dtype, device=device)  # the torch path's block
    ops.score_edges_into(again[2:2 + rows, 1:1 + n_d], sources, G, alpha=-0.75, workspace=workspace)
    assert torch.equal(again[2:2 + rows, 1:1 + n_d], big[2:2 + rows, 1:1 + n_d])
    # head groups given per head [n, c, w] (strided views into a wider buffer, as the scorer batches several layers'
    # heads): the same sums
    per_head = []
    for dl, W in sources:
        if W is None:
            per_head.append((dl, W))
            continue
        n, w = W.shape[:2]
        wide = torch.full((c, n * w + 3), float("nan"), dtype=dtype, device=device)
        wide[:, :n * w] = dl
        per_head.append((wide.as_strided((n, c, w), (w, n * w + 3, 1)), W))
    third = big.clone()
    third[2:2 + rows, 1:1 + n_d].copy_(start)
    ops.score_edges_into(third[2:2 + rows, 1:1 + n_d], per_head, G, alpha=-0.75)
    assert ((third.cpu()[2:2 + rows, 1:1 + n_d].double() - want).abs() <= unit * (magnitude + start.abs().double())).all()
    with pytest.raises(CTFastError, match="score 10 rows, out has 9"):
        ops.score_edges_into(block[:9], sources, G)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("c,split,aligned", [(36, 4, False), (36, 3, False), (37, 4, False), (36, 4, True)])
def test_score_products_split_over_token_blocks(monkeypatch, device, c, split, dtype, aligned):
    """The torch path's score product split over ``split`` token blocks (``gemm.split_mm``: partial products, summed
    in fp32) adds the same scores into a strided block as the one GEMM, within the dtype's unit roundoff of the
    absolute sums; outside the block every element keeps its NaN; a token count ``split`` does not divide is
    scored as one GEMM, bit for bit. ``aligned``: the GPU's padded partial products (16-byte rows), forced here."""
    monkeypatch.setenv("CT_FAST_BACKEND", "torch")
    if aligned:
        if torch.device(device).type == "cuda":
            pytest.skip("a GPU pads anyway: the unaligned cases are its aligned ones")
        real_bmm, padded = torch.bmm, []
        monkeypatch.setattr(ops.gemm, "aligns", lambda device: True)
        monkeypatch.setattr(torch, "bmm", lambda a, b, out=None: real_bmm(a, b) if out is None else (
            padded.append(out.stride(1) - out.shape[2]), real_bmm(a, b, out=out))[1])
    g = _gen(c * 10 + split)
    n_d, d = 5, 24
    sources = [(torch.randn(c, 3 * 8, generator=g).to(device, dtype), torch.randn(3, 8, d, generator=g).to(device, dtype)),
               (torch.randn(c, d, generator=g).to(device, dtype), None)]
    G = torch.randn(n_d, c, d, generator=g).to(device, dtype)
    start = torch.randn(4, n_d, generator=g).to(device)
    blocks = {}
    for s in (1, split):
        big = torch.full((6, n_d + 2), float("nan"), device=device)
        big[1:5, 1:1 + n_d] = start
        ops.score_edges_into(big[1:5, 1:1 + n_d], sources, G, alpha=0.5, split=s)
        blocks[s] = big.cpu()
    assert blocks[split][1:5, 1:1 + n_d].isfinite().all() and blocks[split].isnan().sum() == blocks[1].isnan().sum()
    if aligned:  # the split product's [split, rows, n_d] partials went into padded rows
        assert padded and max(padded) > 0  # (the contributions' bmm writes a contiguous block)
    if c % split:
        assert torch.equal(blocks[split][1:5, 1:1 + n_d], blocks[1][1:5, 1:1 + n_d])
        return
    per_group = torch.cat([ops.reference.score_edges(dl.double().cpu(), None if W is None else W.double().cpu(),
                                                     G.double().cpu()) for dl, W in sources])
    magnitude = torch.cat([ops.reference.score_edges(dl.abs().double().cpu(), None if W is None else W.abs().double().cpu(),
                                                     G.abs().double().cpu()) for dl, W in sources])
    unit = 2.0 ** -20 if dtype == torch.float32 else HALF_UNIT[dtype]
    want = start.cpu().double() + 0.5 * per_group
    assert ((blocks[split][1:5, 1:1 + n_d].double() - want).abs() <= unit * (magnitude + start.cpu().abs().double())).all()


@pytest.mark.triton
@pytest.mark.skipif(ops.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
                    reason="Triton cannot run here")
@pytest.mark.parametrize("layout", ["uneven", "unaligned", "even"])
def test_score_edges_kernel_groups_many_sources_in_one_launch(monkeypatch, layout):
    """The grouped launch: 17 residual vectors (two blocks of 16 in one launch), a group of 20 heads (two blocks),
    two widths (a launch each) interleaved with the vectors, 70 downstream nodes (two blocks), token splits; each
    group's rows land at its own place. Every scratch buffer starts as NaN (an unwritten partial would show);
    ``unaligned`` gives row strides that are no multiple of 16 bytes (the loads lose the alignment hint), ``even``
    only full blocks of 16 heads or vectors (the launches drop the upstream mask)."""
    from ct_fast.kernels import score_edges_into

    device = "cuda" if torch.cuda.is_available() else "cpu"
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan"))
                        if k.get("dtype", torch.float32).is_floating_point else empty(*a, **k))
    g = _gen(11)
    d, c, n_d = (21, 37, 70) if layout == "unaligned" else (24, 37, 70)
    groups = {"uneven": [(20, 8)] + [(1, None)] * 9 + [(3, 16)] + [(1, None)] * 8 + [(2, 8)],
              "unaligned": [(20, 8)] + [(1, None)] * 9 + [(3, 5)] + [(1, None)] * 8 + [(2, 8)],
              "even": [(16, 8)] + [(1, None)] * 9 + [(32, 16)] + [(1, None)] * 7 + [(16, 8)]}[layout]
    sources = []
    for n, w in groups:
        W = None if w is None else torch.randn(n, w, d, generator=g).to(device)
        sources.append((torch.randn(c, d if w is None else n * w, generator=g).to(device), W))
    G = torch.randn(n_d, c, d, generator=g).to(device)
    rows = sum(n for n, _ in groups)
    start = torch.randn(rows, n_d, generator=g)
    out = start.to(device, copy=True)
    score_edges_into(out, sources, G, alpha=0.5)
    per_group = torch.cat([ops.reference.score_edges(*[None if t is None else t.double().cpu() for t in (dl, W)],
                                                     G.double().cpu()) for dl, W in sources])
    magnitude = torch.cat([ops.reference.score_edges(dl.abs().double().cpu(),
                                                     None if W is None else W.abs().double().cpu(),
                                                     G.abs().double().cpu()) for dl, W in sources])
    err = (out.cpu().double() - (start.double() + 0.5 * per_group)).abs()
    assert (err <= 2.0 ** -20 * (magnitude + start.abs().double())).all()


@pytest.mark.triton
@pytest.mark.skipif(ops.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
                    reason="Triton cannot run here")
def test_score_edges_kernel_refuses_heads_wider_than_its_tile():
    """The launcher names the limit (the op never sends such heads: it routes them to the torch path)."""
    from ct_fast.kernels.score_edges import max_head_width, score_edges

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = _gen(5)
    for dtype, w in ((torch.float32, 65), (torch.bfloat16, 129)):
        assert max_head_width(dtype) == w - 1
        delta, W, G = (torch.randn(*s, generator=g).to(device, dtype) for s in ((3, 2 * w), (2, w, 8), (1, 3, 8)))
        with pytest.raises(ValueError, match=f"heads of width {w} > {w - 1}"):
            score_edges(delta, W, G)


# (nodes, head width or None, tokens, d_model, projections feeding the nodes, norm): widths over one block of the
# kernel (100 > 64), d_model not a multiple of its blocks, no weight (the node reads the residual itself)
RESID_SHAPES = [(3, 5, 13, 24, 1, "rmsnorm"), (2, 7, 33, 40, 2, "layernorm"), (1, None, 17, 20, 1, "layernorm_plain"),
                (1, None, 13, 20, 2, "rmsnorm"),  # two terms that are the node's gradient itself
                (4, 16, 9, 70, 1, "none"), (2, 100, 5, 30, 2, "rmsnorm"), (2, 3, 6, 8, 1, "generic"),
                (2, 150, 7, 20, 2, "rmsnorm")]  # widths: one block of 64 (held), two (unrolled), three (a loop)



@pytest.mark.parametrize("device,backend", _cases("score_edges"))
def test_score_edges_takes_per_head_deltas_and_refuses_other_shapes(device, backend):
    """``delta`` per head ``[n_u, c, w]`` scores as its rows ``[c, n_u * w]``; a delta, weight or gradient of
    another size is refused with the sizes expected (the kernels would read out of bounds)."""
    g = _gen(53)
    n_u, w, n_d, c, d = 3, 4, 5, 7, 6
    W, delta, G = torch.randn(n_u, w, d, generator=g), torch.randn(c, n_u * w, generator=g), torch.randn(n_d, c, d,
                                                                                                        generator=g)
    per_head = delta.reshape(c, n_u, w).transpose(0, 1)
    dev = lambda *ts: [None if t is None else t.to(device) for t in ts]  # noqa: E731
    assert_close(ops.score_edges(*dev(per_head, W, G)).cpu(), ops.score_edges(*dev(delta, W, G)).cpu())
    for bad in (delta[:, 1:], delta[1:], torch.randn(n_u, c, w + 1)):
        with pytest.raises(CTFastError, match=r"delta must be \[7, 12\]"):
            ops.score_edges(*dev(bad, W, G))
    with pytest.raises(CTFastError, match="up_weight must be"):
        ops.score_edges(*dev(delta, torch.randn(n_u, w, d + 1), G))
    with pytest.raises(CTFastError, match="delta must be"):
        ops.score_edges(*dev(torch.randn(c, d + 1), None, G))


class _ScaledTanhNorm(torch.nn.Module):  # a per-token "norm" with no closed-form kernel: the composite path
    def forward(self, x):
        return torch.tanh(x) * 1.5


def _norm(kind, d, g):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if kind == "none":
        return None
    if kind == "generic":
        return _ScaledTanhNorm()
    norm = LlamaRMSNorm(d, eps=1e-5) if kind == "rmsnorm" else torch.nn.LayerNorm(d, elementwise_affine=kind == "layernorm")
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,backend", _cases("residual_grads"))
@pytest.mark.parametrize("n,w,c,d,n_terms,kind", RESID_SHAPES, ids=lambda s: str(s))
def test_residual_grads(device, backend, n, w, c, d, n_terms, kind, dtype):
    """Each node's gradient in residual space through its norm, against an fp64 autograd oracle: rows as a column
    slice of a wider tap (row stride), weights as strided views (a Conv1D layout), the output NaN-poisoned."""
    import copy

    g = _gen(n * 1000 + c + d)
    norm = _norm(kind, d, g)
    x = torch.randn(c, d, generator=g) * 2 + 0.5
    terms, oracle_dy = [], torch.zeros(n, c, d, dtype=torch.float64)
    for _ in range(n_terms):
        if w is None:
            rows, weight = torch.randn(c, d + 3, generator=g)[:, 1:1 + d], None
            oracle_dy += rows.double()
        else:
            rows = torch.randn(c, n * w + 5, generator=g)[:, 2:2 + n * w]
            weight = torch.randn(d, n * w, generator=g).t().reshape(n, w, d) if n_terms == 1 else \
                torch.randn(n, w, d, generator=g)
            oracle_dy += torch.einsum("cnw,nwd->ncd", rows.double().reshape(c, n, w), weight.double())
        terms.append((rows.to(device, dtype), None if weight is None else weight.to(device, dtype)))
    if norm is None:
        want = oracle_dy
    else:
        _, vjp = torch.func.vjp(copy.deepcopy(norm).double(), x.double())
        want = torch.func.vmap(vjp)(oracle_dy)[0]
    out = torch.full((n, c, d), float("nan"), dtype=dtype, device=device)
    got = ops.residual_grads(terms, out, None if norm is None else norm.to(device), x.to(device, dtype))
    assert got is out and torch.isfinite(out).all(), "a lane of the output was left unwritten"
    err = (out.double().cpu() - want).abs().max()
    scale = want.abs().max()
    if dtype == torch.float32:
        assert err <= 1e-5 * scale, (err, scale)
    else:  # half-precision operands: within twice the torch path's error plus one bf16 rounding of the result
        torch_path = ops.reference.residual_grads(terms, torch.empty_like(out), None if norm is None else
                                                  norm.to(device), x.to(device, dtype))
        ref_err = (torch_path.double().cpu() - want).abs().max()
        assert err <= 2 * ref_err + 2.0 ** -8 * scale, (err, ref_err, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,backend", _cases("residual_grads"))
@pytest.mark.parametrize("counts,kind", [((3, 1, 1), "rmsnorm"), ((2, 3, 1, 2), "layernorm"), ((1, 2), "none"),
                                         ((2, 2), "mixed")], ids=str)
def test_residual_grads_blocks(device, backend, counts, kind, dtype):
    """Consecutive one-projection blocks read through one norm (a layer's query, key and value heads; four blocks:
    two launches of the kernel's three) equal one ``residual_grads`` per block: rows with their own row strides,
    the output NaN-poisoned; blocks whose weights differ in layout ("mixed") go block by block."""
    g = _gen(sum(counts) * 7 + len(kind))
    c, d, w = 11, 24, 6
    norm = _norm("rmsnorm" if kind == "mixed" else kind, d, g)
    x = (torch.randn(c, d, generator=g) * 2 + 0.5).to(device, dtype)
    blocks = []
    for i, n in enumerate(counts):
        rows = torch.randn(c, n * w + 2 * i + 1, generator=g)[:, i:i + n * w]
        weight = torch.randn(n, w, d, generator=g)
        if kind == "mixed" and i == 1:
            weight = torch.randn(d, n * w, generator=g).t().reshape(n, w, d)  # a transposed (Conv1D) layout
        blocks.append((rows.to(device, dtype), weight.to(device, dtype)))
    out = torch.full((sum(counts), c, d), float("nan"), dtype=dtype, device=device)
    sums = torch.full((sum(counts), d), float("nan"), device=device)
    module = None if norm is None else norm.to(device)
    got = ops.residual_grads_blocks(blocks, out, module, x, sums=sums)
    want, first = torch.empty_like(out), 0
    for rows, weight in blocks:
        ops.residual_grads([(rows, weight)], want[first:first + weight.shape[0]], module, x)
        first += weight.shape[0]
    assert got is out and torch.isfinite(out).all(), "a lane of the output was left unwritten"
    tol = 1e-6 if dtype == torch.float32 else 2.0 ** -7
    assert ((out - want).abs().max() / want.abs().max()).item() <= tol
    # token sums on every path (the kernel's partials, or a sum of the output): the sums of the stored values
    assert ((sums - out.float().sum(1)).abs().max() / out.float().sum(1).abs().max()).item() <= 1e-5


@pytest.mark.parametrize("device,backend", _cases("residual_grads"))
def test_residual_grads_into_a_strided_output(device, backend):
    """``out`` a token slice of a wider buffer (any strides, as the torch path takes): every backend writes exactly
    that view — the same values as a contiguous output, the buffer's other tokens untouched."""
    g = _gen(59)
    n, w, c, d = 3, 5, 9, 16
    norm = _norm("rmsnorm", d, g).to(device)
    x = (torch.randn(c, d, generator=g) + 0.5).to(device)
    terms = [(torch.randn(c, n * w, generator=g).to(device), torch.randn(n, w, d, generator=g).to(device))]
    want = ops.residual_grads(terms, torch.empty(n, c, d, device=device), norm, x)
    buffer = torch.full((n, c + 4, d), float("nan"), device=device)
    sums = torch.full((n, d), float("nan"), device=device)
    ops.residual_grads(terms, buffer[:, 2:2 + c], norm, x, sums=sums)
    assert_close(buffer[:, 2:2 + c], want)
    assert torch.isnan(buffer[:, :2]).all() and torch.isnan(buffer[:, 2 + c:]).all()
    assert_close(sums, want.sum(1))


@pytest.mark.triton
@pytest.mark.skipif(ops.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
                    reason="Triton cannot run here")
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm", "none"])
@pytest.mark.parametrize("blocks,w,two", [((5,), 6, False), ((3, 2, 2), 6, False), ((3,), 70, True)], ids=str)
def test_residual_grads_kernel_tiles_span_node_groups_and_partial_blocks(kind, blocks, w, two):
    """The Triton kernels with tiles far smaller than the shapes: several node groups a launch (the last partial,
    groups straddling a query/key/value block boundary), partial token and d_model blocks, head widths over one
    block (70: two 64-wide blocks, the second nearly empty), equal to the torch path; the output NaN-poisoned."""
    from ct_fast import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = _gen(sum(blocks) * 31 + w + len(kind))
    c, d = 37, 40
    norm = _norm(kind, d, g)
    x = (torch.randn(c, d, generator=g) * 2 + 0.5).to(device)
    if two:
        n = blocks[0]
        parts = [[(torch.randn(c, n * w + 3, generator=g)[:, 1:1 + n * w].to(device),
                   torch.randn(n, w, d, generator=g).to(device)) for _ in range(2)]]
    else:
        parts = [[(torch.randn(c, n * w + 2, generator=g)[:, 2:2 + n * w].to(device),
                   torch.randn(n, w, d, generator=g).to(device))] for n in blocks]
    n = sum(blocks)
    stats = ops.reference.norm_stats(norm.to(device), x) if norm is not None else (None, None, None)
    config = dict(BT=16, BK=16, NB=2, num_warps=4, num_stages=2, dots=dict(BT=16, BK=16, num_warps=4, num_stages=2))
    out = torch.full((n, c, d), float("nan"), device=device)
    sums = torch.full((n, d), float("nan"), device=device)
    if two:
        kernels.residual_grads(parts[0], out, x, stats[:2], stats[2], kind, config=config, sums=sums)
    else:
        kernels.residual_grads_blocks([p[0] for p in parts], out, x, stats[:2], stats[2], kind, config=config,
                                      sums=sums)
    want, first = torch.empty_like(out), 0
    for terms in parts:
        m = terms[0][1].shape[0]
        ops.reference.residual_grads(terms, want[first:first + m], norm, x)
        first += m
    assert torch.isfinite(out).all(), "a lane of the output was left unwritten"
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
    # the token sums, from the kernel's per-token-block partials: the sums of what it stored
    assert_close(sums, out.sum(1), name="token sums")


@pytest.mark.triton
@pytest.mark.skipif(ops.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
                    reason="Triton cannot run here")
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("two", [False, True])
def test_residual_grads_fp32_output_from_half_weights_keeps_fp32_precision(kind, two):
    """bf16 rows and weights into an fp32 output: the products are exact in fp32, and the norm's reductions take the
    normalised input in two half-precision parts (one would round it to bf16: ~3e-4 relative error) — within 1e-5 of
    an fp64 oracle on the same bf16 inputs."""
    import copy

    from ct_fast import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = _gen(17 + two)
    n, w, c, d = 3, 16, 21, 48
    norm = _norm(kind, d, g)
    x = (torch.randn(c, d, generator=g) * 2 + 0.5).to(torch.bfloat16)
    bf16 = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
    terms = [(bf16(c, n * w), bf16(n, w, d)) for _ in range(2 if two else 1)]
    dy = sum(torch.einsum("cnw,nwd->ncd", r.double().reshape(c, n, w), W.double()) for r, W in terms)
    _, vjp = torch.func.vjp(copy.deepcopy(norm).double(), x.double())
    want = torch.func.vmap(vjp)(dy)[0]
    mean, rstd, gamma = ops.reference.norm_stats(norm, x)
    out = torch.full((n, c, d), float("nan"), device=device)
    kernels.residual_grads([(r.to(device), W.to(device)) for r, W in terms], out, x.to(device),
                           (None if mean is None else mean.to(device), rstd.to(device)), gamma.to(device), kind)
    assert (out.double().cpu() - want).abs().max() <= 1e-5 * want.abs().max()


# (N tokens, in, out, selection): awkward sizes, k not a multiple of any block, N = 0, empty and full selections
DW_SHAPES = [(1, 1, 1, "all"), (19, 7, 5, "some"), (37, 33, 21, "none"), (50, 40, 17, "strided"), (0, 5, 3, "some"),
             (23, 6, 9, "empty")]


def _dw_index(spec, n_features, g):
    if spec == "none":
        return None
    if spec == "all":
        return torch.arange(n_features)
    if spec == "empty":
        return torch.zeros(0, dtype=torch.long)
    if spec == "strided":
        return torch.arange(n_features - 1, -1, -3)  # descending, every third feature
    return torch.randperm(n_features, generator=g)[:max(1, n_features // 2)]


def _dw_check(got, x, go, index, out_features, dtype, fp32_result=True):
    """fp32 result within fp32 accumulation error of the exact product of the (rounded) operands, and within the
    dtype's band of the same-dtype torch reference. ``fp32_result=False``: the torch path, whose bf16/fp16 GEMM
    rounds its output to that dtype (the band check only)."""
    exact = ops.reference.masked_weight_grad(x.double(), go.double(), index, out_features)
    magnitude = ops.reference.masked_weight_grad(x.double().abs(), go.double().abs(), index, out_features)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    got = got.cpu().double()
    assert torch.isfinite(got).all(), "an output element was not written"
    if fp32_result or dtype == torch.float32:
        assert ((got - exact).abs() <= 1e-5 * magnitude + 1e-30).all(), (got - exact).abs().max()
    assert_close(got.float(), ops.reference.masked_weight_grad(x, go, index, out_features).float(), dtype=dtype)


@pytest.mark.parametrize("device,backend", _cases("masked_weight_grad"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("out_features", [True, False])
@pytest.mark.parametrize("shape", DW_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_masked_weight_grad(device, backend, dtype, out_features, shape):
    n, n_in, n_out, spec = shape
    g = _gen(n * 7 + n_in)
    x, go = torch.randn(n, n_in, generator=g).to(dtype), torch.randn(n, n_out, generator=g).to(dtype)
    index = _dw_index(spec, n_out if out_features else n_in, g)
    got = ops.masked_weight_grad(x.to(device), go.to(device), None if index is None else index.to(device),
                                 out_features)
    _dw_check(got, x, go, index, out_features, dtype, fp32_result=backend != "torch")


@pytest.mark.parametrize("device,backend", _cases("masked_weight_grad"))
def test_masked_weight_grad_strided_inputs(device, backend):
    """Transposed / sliced operands (what a reshape of a non-contiguous activation gives) and an int32 index."""
    g = _gen(8)
    x = torch.randn(13, 29, generator=g).t()[:, 2:11]  # [29, 9], column stride 29
    go = torch.randn(29, 30, generator=g)[:, ::2]  # [29, 15], column stride 2
    for out_features, idx in ((True, torch.tensor([14, 0, 7, 3], dtype=torch.int32)), (False, torch.tensor([8, 1])),
                              (True, _strided(torch.tensor([2, 11, 5])))):  # a strided index view
        got = ops.masked_weight_grad(x.to(device), go.to(device), idx.to(device), out_features)
        _dw_check(got, x, go, idx.long(), out_features, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_gemm_padding_gives_the_unpadded_results(dtype, monkeypatch):
    """On a GPU the torch path pads the circuit's GEMMs to 16-byte aligned leading dimensions (``ops.gemm``: a
    gathered block of k features, a score block of n_d nodes). Forced here on the CPU: the padded calls really
    pad (an 8-wide bf16 / 4-wide fp32 gather for k = 5, score rows of 8 for n_d = 5) and return what the unpadded
    calls return, no padding row or column in the results."""
    g = _gen(41)
    x, go = torch.randn(37, 22, generator=g).to(dtype), torch.randn(37, 20, generator=g).to(dtype)
    index = torch.tensor([17, 2, 9, 11, 4])
    n_d, d, c = 5, 24, 7
    sources = [(torch.randn(c, 3 * 8, generator=g).to(dtype), torch.randn(3, 8, d, generator=g).to(dtype)),
               (torch.randn(c, d, generator=g).to(dtype), None)]
    G = torch.randn(n_d, c, d, generator=g).to(dtype)
    monkeypatch.setenv("CT_FAST_BACKEND", "torch")
    plain = [ops.masked_weight_grad(x, go, index, f) for f in (True, False)]
    plain_scores = ops.score_edges_into(torch.zeros(4, n_d), sources, G)

    monkeypatch.setattr(ops.gemm, "aligns", lambda device: True)
    per = 16 // dtype.itemsize
    gathered, products = [], []
    real_dw, real_mm = library.DEFAULTS["masked_weight_grad"], torch.mm
    monkeypatch.setitem(library.DEFAULTS, "masked_weight_grad",
                        lambda x, go, idx, f: (gathered.append(idx.numel()), real_dw(x, go, idx, f))[1])
    monkeypatch.setattr(torch, "mm", lambda a, b, out: (products.append(out.stride()), real_mm(a, b, out=out))[1])
    padded = [ops.masked_weight_grad(x, go, index, f) for f in (True, False)]
    scores = ops.score_edges_into(torch.zeros(4, n_d), sources, G)
    assert gathered == [-(-5 // per) * per] * 2 and products == [(-(-n_d // per) * per, 1)]
    assert ops.gemm.padded_index(index, dtype) is ops.gemm.padded_index(index, dtype)  # made once per index
    for got, want in zip(padded, plain):
        assert got.shape == want.shape == (5, want.shape[1]) and got.is_contiguous()
        assert_close(got, want, dtype=dtype)
    assert_close(scores, plain_scores, dtype=dtype)
    assert ops.gemm.padded_index(torch.arange(per), dtype).numel() == per  # aligned already: unchanged
    assert ops.gemm.padded_index(torch.arange(0), dtype).numel() == 0
    assert ops.gemm.padded_index(torch.arange(1), dtype).numel() == 1  # one feature: a GEMV, left as it is
    assert ops.gemm.mm(x.t(), go[:, :1]).stride() == (1, 1)
    w = go.clone().requires_grad_()
    ops.gemm.mm(x.t(), w).sum().backward()  # under autograd: the plain product (out= has no gradient)
    assert w.grad is not None and len(products) == 1


@pytest.mark.triton
@pytest.mark.skipif(ops.triton_available(torch.device("cpu")) is not None
                    and not torch.cuda.is_available(), reason="Triton cannot run here")
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_masked_weight_grad_writes_every_element(splits, dtype):
    """NaN-poisoned output and split-N workspace: every element is written (by each split), none left NaN.
    (block_k 16 on every device: 70 tokens give each of up to 5 splits at least one BLOCK_K step.)"""
    from ct_fast import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = _gen(splits)
    n, n_in, n_out = 70, 21, 35
    x, go = torch.randn(n, n_in, generator=g).to(dtype), torch.randn(n, n_out, generator=g).to(dtype)
    index = torch.tensor([34, 0, 5, 6, 7, 20, 33, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 30])  # k = 18: two row blocks
    for out_features in (True, False):
        idx = index if out_features else index[index < n_in]
        other = n_in if out_features else n_out
        out = torch.full((idx.numel(), other), float("nan"), device=device)
        ws = torch.full((splits, idx.numel(), other), float("nan"), device=device) if splits > 1 else None
        got = kernels.masked_weight_grad(x.to(device), go.to(device), idx.to(device), out_features, out=out,
                                         workspace=ws, config=dict(splits=splits, block_k=16))
        assert got.data_ptr() == out.data_ptr()
        if ws is not None:
            assert not torch.isnan(ws).any(), "a split left part of its partial unwritten"
        _dw_check(got, x, go, idx, out_features, dtype)


def test_masked_weight_grad_kernel_stays_out_of_auto(monkeypatch):
    """The Triton dW joins auto only once committed GPU results show it faster than gather + cuBLAS."""
    monkeypatch.delenv("CT_FAST_BACKEND", raising=False)
    monkeypatch.setattr(measured, "_table", {})  # no GPU results: the defaults
    assert ("masked_weight_grad", "triton") in ops.AUTO_SKIP and "masked_weight_grad" in ops.TRITON_OPS
    assert ops.choose_backend("masked_weight_grad", torch.device("cuda"), (torch.bfloat16,)) == "torch"
    assert ops.choose_backend("masked_weight_grad", torch.device("cpu"), (torch.bfloat16,)) == "torch"


def _optimizer_case(seed, dtype, shapes=((7, 5), (5, 1), (3, 33), (1, 1), (9, 4)), col=(False, False, True, False, True),
                    device="cpu"):
    """Params as row views (some are column views of a [M, R] tensor), selections incl. empty and full."""
    g = _gen(seed)
    full, views, grads, rows, slots, m, v, steps = [], [], [], [], [], [], [], []
    for i, ((R, M), is_col) in enumerate(zip(shapes, col)):
        base = torch.randn((M, R) if is_col else (R, M), generator=g).to(dtype)
        view = base.t() if is_col else base
        pick = [torch.arange(R), torch.tensor([R - 1]), torch.arange(0, R, 2), torch.zeros(0, dtype=torch.long),
                torch.tensor([2, 0])][i % 5]
        cap = R + 2
        slot = torch.randperm(cap, generator=g)[:pick.numel()]
        full.append(base)
        views.append(view)
        rows.append(pick)
        slots.append(slot)
        grads.append(torch.randn(pick.numel(), M, generator=g))
        m.append(torch.randn(cap, M, generator=g))
        v.append(torch.rand(cap, M, generator=g))
        steps.append(torch.randint(0, 4, (cap,), generator=g).float())
    if device != "cpu":
        full = [t.to(device) for t in full]
        views = [t.t() if c else t for t, c in zip(full, col)]
        grads, rows, slots, m, v, steps = ([t.to(device) for t in ts] for ts in (grads, rows, slots, m, v, steps))
    return full, views, grads, rows, slots, m, v, steps


def _clone(xs):
    return [x.clone() for x in xs]


def _views_like(tensors, views):
    """Row views of ``tensors`` shaped like ``views`` (a transposed view where the original was one)."""
    return [t if v.stride() == t.stride() and v.shape == t.shape else t.t() for t, v in zip(tensors, views)]


def _assert_param_close(got, want, name="param"):
    """fp32: the fp32 tolerance. bf16/fp16: the reference rounds its fp32 result to nearest-even, and so must a
    kernel: bit-equal but for rare one-ulp flips where the fp32 intermediates differ in their last bits (at most 1%
    of the elements, never more than one ulp). Truncation would differ in about half the elements."""
    if got.dtype == torch.float32:
        return assert_close(got, want, name=name)
    assert got.dtype == want.dtype
    ulps = (got.cpu().view(torch.int16).int() - want.cpu().view(torch.int16).int()).abs()
    flips = int((ulps != 0).sum())
    assert int(ulps.max()) <= 1 and flips <= max(1, got.numel() // 100), \
        f"{name}: {flips} of {got.numel()} {got.dtype} elements differ from the reference (max {int(ulps.max())} ulp)"


def _assert_rows_outside_unchanged(view, rows, start):
    """The rows of ``view`` not in ``rows`` are bit-equal to ``start``'s."""
    untouched = torch.ones(view.shape[0], dtype=torch.bool, device=view.device)
    untouched[rows] = False
    assert torch.equal(view[untouched], start[untouched]), "rows outside the selection changed"


def test_param_check_rejects_truncation():
    """The bf16 check above catches a kernel that truncates instead of rounding to nearest-even."""
    x = torch.randn(2112, generator=_gen(0)) * 3
    rne = x.to(torch.bfloat16)
    truncated = (x.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    _assert_param_close(rne, rne)
    with pytest.raises(AssertionError, match="differ from the reference"):
        _assert_param_close(truncated, rne)


@pytest.mark.parametrize("device,backend", _cases("masked_adamw_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("maximize,wd", [(False, 0.0), (True, 0.1)])
def test_masked_adamw(device, backend, dtype, maximize, wd):
    full, views, grads, rows, slots, m, v, steps = _optimizer_case(5, dtype, device=device)
    ref_full = _clone(full)
    ref_views = _views_like(ref_full, views)
    ref_m, ref_v, ref_steps = _clone(m), _clone(v), _clone(steps)
    args = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, maximize=maximize)
    library.masked_adamw_default(ref_views, grads, ref_m, ref_v, [], ref_steps, rows, slots, *args.values())
    ops.masked_adamw_(views, grads, m, v, [], steps, rows, slots, *args.values())
    for i in range(len(full)):
        _assert_param_close(full[i], ref_full[i], name=f"param {i}")
        assert_close(m[i], ref_m[i], name=f"exp_avg {i}")
        assert_close(v[i], ref_v[i], name=f"exp_avg_sq {i}")
        assert torch.equal(steps[i], ref_steps[i])
        _assert_rows_outside_unchanged(views[i], rows[i], _optimizer_case(5, dtype, device=device)[1][i])


@pytest.mark.parametrize("device,backend", _cases("masked_sgd_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum,nesterov,dampening", [(0.0, False, 0.0), (0.9, False, 0.1), (0.9, True, 0.0)])
def test_masked_sgd(device, backend, dtype, momentum, nesterov, dampening):
    full, views, grads, rows, slots, m, _, steps = _optimizer_case(7, dtype, device=device)
    ref_full, ref_m, ref_steps = _clone(full), _clone(m), _clone(steps)
    ref_views = _views_like(ref_full, views)
    bufs, ref_bufs = (m, ref_m) if momentum else ([], [])
    args = (0.1, momentum, dampening, 0.01, nesterov, False)
    library.masked_sgd_default(ref_views, grads, ref_bufs, ref_steps, rows, slots, *args)
    ops.masked_sgd_(views, grads, bufs, steps, rows, slots, *args)
    for i in range(len(full)):
        _assert_param_close(full[i], ref_full[i], name=f"param {i}")
        if momentum:
            assert_close(m[i], ref_m[i], name=f"buffer {i}")
        _assert_rows_outside_unchanged(views[i], rows[i], _optimizer_case(7, dtype, device=device)[1][i])


@pytest.mark.parametrize("device,backend", _cases("masked_adamw_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_masked_updates_on_column_views_span_tiles(device, backend, dtype, optimizer):
    """Column views (an output projection's head columns) and short rows, which the CUDA kernels update in tiles of
    32 rows x 64 columns through shared memory: every row of a 70-row column view (three row tiles, the last partial;
    150 columns: three column tiles), every other row of a 66-row one (33 rows: a full tile and one row; 129
    columns), one row of a 5-wide row view (short rows are tiled too) — against the reference, untouched rows
    bit-equal."""
    shapes, col = ((70, 150), (45, 5), (66, 129)), (True, False, True)
    case = lambda: _optimizer_case(11, dtype, shapes=shapes, col=col, device=device)  # noqa: E731
    full, views, grads, rows, slots, m, v, steps = case()
    ref_full, ref_m, ref_v, ref_steps = _clone(full), _clone(m), _clone(v), _clone(steps)
    ref_views = _views_like(ref_full, views)
    if optimizer == "adamw":
        args = (1e-2, 0.9, 0.99, 1e-8, 0.1, False)
        library.masked_adamw_default(ref_views, grads, ref_m, ref_v, [], ref_steps, rows, slots, *args)
        ops.masked_adamw_(views, grads, m, v, [], steps, rows, slots, *args)
    else:
        args = (0.1, 0.9, 0.1, 0.01, False, False)
        library.masked_sgd_default(ref_views, grads, ref_m, ref_steps, rows, slots, *args)
        ops.masked_sgd_(views, grads, m, steps, rows, slots, *args)
    start = case()[1]
    for i in range(len(full)):
        _assert_param_close(full[i], ref_full[i], name=f"param {i}")
        assert_close(m[i], ref_m[i], name=f"state {i}")
        assert_close(v[i], ref_v[i], name=f"exp_avg_sq {i}")
        assert torch.equal(steps[i], ref_steps[i])
        _assert_rows_outside_unchanged(views[i], rows[i], start[i])


@pytest.mark.parametrize("device,backend", _cases("masked_adamw_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_masked_updates_same_bits_through_row_and_column_views(device, backend, dtype, optimizer):
    """The same rows updated through a column view (the kernels' tiled path) and a row-major copy (their per-row path)
    come out bit-equal: parameters, states and step counts. The first 32 selected rows are one run of consecutive rows
    (the Triton tiles address those as ``first + i``), the rest scattered and unsorted."""
    g = _gen(23)
    R, M = 80, 70
    base = torch.randn(M, R, generator=g).to(device, dtype)
    rows = torch.cat([torch.arange(3, 35), torch.tensor([40, 41, 79, 0, 50])]).to(device)
    slots = torch.randperm(40, generator=g)[:rows.numel()].to(device)
    grads = torch.randn(rows.numel(), M, generator=g).to(device)
    states = [torch.randn(40, M, generator=g).to(device), torch.rand(40, M, generator=g).to(device)]
    steps = torch.randint(0, 3, (40,), generator=g).float().to(device)
    results = []
    for view in (base.clone().t(), base.t().contiguous()):  # [R, M]: a column view, then a row-major copy
        assert (view.stride(1) != 1) == (len(results) == 0)
        m, v, st = states[0].clone(), states[1].clone(), steps.clone()
        if optimizer == "adamw":
            ops.masked_adamw_([view], [grads], [m], [v], [], [st], [rows], [slots], 1e-2, 0.9, 0.99, 1e-8, 0.1,
                              False)
        else:
            ops.masked_sgd_([view], [grads], [m], [st], [rows], [slots], 0.1, 0.9, 0.1, 0.01, True, False)
        results.append((view.contiguous(), m, v, st))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(_emulation_missing() is not None, reason=str(_emulation_missing()))
@pytest.mark.parametrize("op", ["masked_adamw_", "masked_sgd_"])
def test_emulated_cuda_binding_packs_many_tensors_of_two_dtypes(op):
    """One call over 47 parameters, fp32 and bf16 mixed: the CUDA binding groups them by dtype into launches of at most
    36 descriptors each (kernel parameters: no device table) — every parameter, state and step count as the
    reference's, the skip flag checked over every pack first."""
    emulated = cuda_emu.load()
    shapes = [((3 + i % 5, 1 + (7 * i) % 40)) for i in range(47)]
    cases = [_optimizer_case(47 + k, dtype, shapes=shapes[k::2], col=[i % 3 == 0 for i in range(len(shapes[k::2]))])
             for k, dtype in enumerate((torch.float32, torch.bfloat16))]
    lists = [sum((list(c[j]) for c in cases), []) for j in range(8)]  # full, views, grads, rows, slots, m, v, steps
    want = [_clone(t) for t in lists]
    want[1] = _views_like(want[0], lists[1])
    assert len(lists[1]) == 47 and {p.dtype for p in lists[1]} == {torch.float32, torch.bfloat16}
    if op == "masked_adamw_":
        args = (1e-2, 0.9, 0.99, 1e-8, 0.1, False)
        library.masked_adamw_default(want[1], lists[2], want[5], want[6], [], want[7], lists[3], lists[4], *args)
        emulated.masked_adamw_(lists[1], lists[2], lists[5], lists[6], [], lists[7], lists[3], lists[4], *args, None,
                               torch.zeros(1))
    else:
        args = (0.1, 0.9, 0.1, 0.01, False, False)
        library.masked_sgd_default(want[1], lists[2], want[5], want[7], lists[3], lists[4], *args)
        emulated.masked_sgd_(lists[1], lists[2], lists[5], lists[7], lists[3], lists[4], *args, None, torch.zeros(1))
    for i in range(47):
        _assert_param_close(lists[0][i], want[0][i], name=f"param {i}")
        assert_close(lists[5][i], want[5][i], name=f"state {i}")
        assert torch.equal(lists[7][i], want[7][i])


@pytest.mark.skipif(_emulation_missing() is not None, reason=str(_emulation_missing()))
def test_emulated_cuda_kernels_do_not_depend_on_thread_order():
    """Under the CUDA emulation a block's threads run first to last between barriers, or last to first: the masked
    optimizers (row units and column tiles, fp32 and bf16) and the scoring kernel give the same bits both ways — no
    thread reads what another writes without a barrier between them."""
    emulated = cuda_emu.load()
    shapes, col = ((70, 150), (45, 5), (66, 129), (9, 300)), (True, False, True, False)
    results = []
    for reverse in (False, True):
        emulated.set_reverse_order(reverse)
        try:
            out = []
            for dtype in (torch.float32, torch.bfloat16):
                full, views, grads, rows, slots, m, v, steps = _optimizer_case(41, dtype, shapes=shapes, col=col)
                emulated.masked_adamw_(views, grads, m, v, [], steps, rows, slots, 1e-2, 0.9, 0.99, 1e-8, 0.1, False,
                                       None, None)
                emulated.masked_sgd_(views, grads, m, steps, rows, slots, 0.1, 0.9, 0.1, 0.01, True, False, None,
                                     torch.zeros(1))
                out += full + m + v + steps
            g = _gen(43)
            out.append(emulated.score_edges(torch.randn(40, 3 * 8, generator=g), torch.randn(3, 8, 20, generator=g),
                                            torch.randn(5, 40, 20, generator=g)))
            results.append(out)
        finally:
            emulated.set_reverse_order(False)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("device,backend", _cases("masked_sgd_"))
def test_masked_sgd_without_momentum_ignores_buffers(device, backend):
    """Buffers passed with momentum=0 (and dampening) are neither used nor written, as in torch."""
    full, views, grads, rows, slots, m, _, steps = _optimizer_case(37, torch.float32, device=device)
    ref_full, ref_steps, m0 = _clone(full), _clone(steps), _clone(m)
    library.masked_sgd_default(_views_like(ref_full, views), grads, [], ref_steps, rows, slots, 0.1, 0.0, 0.5, 0.0,
                               False, False)
    ops.masked_sgd_(views, grads, m, steps, rows, slots, 0.1, 0.0, 0.5, 0.0, False, False)
    for i in range(len(full)):
        assert_close(full[i], ref_full[i], name=f"param {i}")
        assert torch.equal(m[i], m0[i])
    # the backend's own op too (torch.ops.ct_fast / the Triton launcher), called with the buffers
    again = _optimizer_case(37, torch.float32, device=device)
    ops._call("masked_sgd_", backend, again[1], again[2], again[5], again[7], again[3], again[4], 0.1, 0.0, 0.5, 0.0,
              False, False, None, None)
    assert all(torch.equal(a, b) for a, b in zip(again[5], m0))
    assert all(torch.equal(a, b) for a, b in zip(again[0], full))



def _strided(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` as a non-contiguous view (every other element of a twice-as-long tensor)."""
    out = torch.stack([t, torch.full_like(t, 10 ** 6)], -1).select(-1, 0)
    assert out.numel() < 2 or not out.is_contiguous()
    return out


@pytest.mark.parametrize("op,device,backend", [pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.id}")
                                               for op in ("masked_adamw_", "masked_sgd_") for p in _cases(op)])
def test_masked_updates_take_strided_rows_and_slots(op, device, backend):
    """Rows and slots given as strided views update the rows they name (the kernels read dense index arrays: the
    op makes them so)."""
    want, got = _optimizer_case(41, torch.float32, device=device), _optimizer_case(41, torch.float32, device=device)
    got = list(got)
    got[3], got[4] = [_strided(r) for r in got[3]], [_strided(s) for s in got[4]]
    _opt_call(op, want, 1e-2)
    _opt_call(op, got, 1e-2)
    _assert_same(_state(got), _state(want), exact=False)


@pytest.mark.parametrize("op,device,backend", [pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.id}")
                                               for op in ("masked_adamw_", "masked_sgd_") for p in _cases(op)])
def test_masked_update_layout_errors(op, device, backend):
    """Lists of different lengths, momentum without buffers and states of another row width are refused by every
    backend before anything is written (zip would drop parameters; a kernel would address other slots' state)."""
    case = _optimizer_case(43, torch.float32, device=device)
    before = _state(case)
    full, views, grads, rows, slots, m, v, steps = case
    with pytest.raises(CTFastError, match="one entry per parameter"):
        _opt_call(op, (full, views, grads[:-1], rows, slots, m, v, steps), 1e-2)
    if op == "masked_sgd_":
        with pytest.raises(CTFastError, match="needs momentum_buffers"):
            ops.masked_sgd_(views, grads, [], steps, rows, slots, 0.1, 0.9, 0.0, 0.0, False, False)
    wide = [torch.zeros(x.shape[0], x.shape[1] + 8, device=device) for x in m]
    with pytest.raises((CTFastError, RuntimeError, ValueError)):
        _opt_call(op, (full, views, grads, rows, slots, wide, wide, steps), 1e-2)
    _assert_same(_state(case), before)


@pytest.mark.parametrize("op", ["masked_adamw_", "masked_sgd_"])
def test_native_cpu_updates_refuse_indices_out_of_range(op):
    """The C++ kernels check each row and slot against the parameter and the state (a view's base would be written
    outside it); nothing is written."""
    if ops.native() is None:
        pytest.skip(str(ops.native_error()))
    for bad in ("row", "slot", "negative"):
        case = _optimizer_case(47, torch.float32)
        full, views, grads, rows, slots, m, v, steps = case
        rows, slots = _clone(rows), _clone(slots)
        if bad == "row":
            rows[0][0] = views[0].shape[0]
        elif bad == "slot":
            slots[0][0] = steps[0].numel()
        else:
            rows[0][0] = -1
        before = _state(case)
        with pytest.raises(RuntimeError, match="out of range"):
            ops._call(op, "cpp", *((views, grads, m, v, [], steps, rows, slots, 1e-2, 0.9, 0.99, 1e-8, 0.0, False)
                                   if op == "masked_adamw_" else
                                   (views, grads, m, steps, rows, slots, 0.1, 0.9, 0.0, 0.0, False, False)),
                      None, None)
        _assert_same(_state(case), before)

def test_opcheck_every_op():
    g = _gen(0)
    full, views, grads, rows, slots, m, v, steps = _optimizer_case(9, torch.float32)
    keep = [0, 2, 4]
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    cases = {
        "score_edges": (torch.randn(6, 12, generator=g), torch.randn(3, 4, 5, generator=g), torch.randn(2, 6, 5, generator=g)),
        "masked_weight_grad": (torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g), torch.tensor([2, 0]), True),
        "masked_bias_grad": (torch.randn(6, 3, generator=g), None),
        "masked_adamw_": (pick(views), pick(grads), pick(m), pick(v), [], pick(steps), pick(rows), pick(slots),
                          1e-2, 0.9, 0.99, 1e-8, 0.0, False),
        "masked_sgd_": (pick(views), pick(grads), pick(m), pick(steps), pick(rows), pick(slots), 0.1, 0.9, 0.0, 0.0,
                        False, False),
    }
    assert set(cases) == set(library.OPS)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.ct_fast, name).default, args, test_utils=utils)
    for name in ("masked_adamw_", "masked_sgd_"):  # device lr and the skip flag (set here: a NaN gradient)
        args = list(cases[name])
        args[1] = [g.clone() for g in args[1]]
        args[1][0][0, 0] = float("nan")
        torch.library.opcheck(getattr(torch.ops.ct_fast, name).default, tuple(args),
                              {"lr_tensor": torch.tensor(1e-2), "found_inf": torch.zeros(1)}, test_utils=utils)


def test_explicit_backend_errors(monkeypatch):
    monkeypatch.setenv("CT_FAST_BACKEND", "cuda")
    with pytest.raises(CTFastError, match="cuda cannot run score_edges"):
        ops.score_edges(torch.randn(2, 3), None, torch.randn(1, 2, 3))
    monkeypatch.setenv("CT_FAST_BACKEND", "bogus")
    with pytest.raises(CTFastError, match="not one of"):
        ops.requested_backend()
    monkeypatch.setenv("CT_FAST_BACKEND", "cpp")
    assert ops.choose_backend("masked_weight_grad", torch.device("cpu")) == "torch"  # no kernel by design
    if ops.native() is not None:
        with pytest.raises(CTFastError, match="dtype torch.int64"):
            ops.choose_backend("masked_adamw_", torch.device("cpu"), (torch.int64,))


def test_auto_prefers_native_on_cpu(monkeypatch):
    monkeypatch.delenv("CT_FAST_BACKEND", raising=False)
    expected = "cpp" if ops.native() is not None else "torch"
    assert ops.choose_backend("masked_adamw_", torch.device("cpu"), (torch.float32,)) == expected
    assert ops.choose_backend("masked_weight_grad", torch.device("cpu"), (torch.float32,)) == "torch"
    assert ops.choose_backend("masked_adamw_", torch.device("cpu"), (torch.int64,)) == "torch"


def _op_record(bench, backend, ms, dtype="torch.bfloat16", err=1e-3, **case):
    time_key, err_key = {"score_edges_op": ("ms", "max_rel_err"), "masked_dw": ("masked_ms", "max_rel_err_vs_torch"),
                         "masked_adamw": ("masked_ms", None), "residual_grads_op": ("ms", "max_rel_err")}[bench]
    rec = {"bench": bench, "device": "cuda", "dtype": dtype, "backend": backend, time_key: ms, **case}
    return {**rec, err_key: err} if err_key else rec


def test_gpu_choices_are_derived_from_timings():
    """A kernel joins auto on a GPU only where it beat the torch path in every measured case, within the dtype's
    error band; faster kernels first; a measured (op, dtype) where none did runs torch alone."""
    a, b = {"n_u": 32, "w": 64, "n_d": 49, "c": 2048, "d": 2048}, {"n_u": 8, "w": 64, "n_d": 9, "c": 512, "d": 512}
    records = [_op_record("score_edges_op", "torch", 10.0, **a), _op_record("score_edges_op", "torch", 2.0, **b),
               _op_record("score_edges_op", "triton", 4.0, **a), _op_record("score_edges_op", "triton", 1.0, **b),
               _op_record("score_edges_op", "cuda", 3.0, **a),
               _op_record("score_edges_op", "cuda", 2.5, **b),  # slower than torch in case b
               _op_record("score_edges_op", "torch", 5.0, dtype="torch.float32", **a),
               _op_record("score_edges_op", "triton", 4.0, dtype="torch.float32", err=3e-4, **a),  # outside fp32's band
               _op_record("score_edges_op", "cuda", 4.5, dtype="torch.float32", err=float("nan"), **a),
               {**_op_record("score_edges_op", "triton", 1.0, dtype="torch.float16", **a), "skipped": "not built"},
               _op_record("masked_dw", "torch", 1.0, tokens=8192, selection="blocks"),
               _op_record("masked_dw", "triton", 0.5, tokens=8192, selection="blocks"),
               _op_record("masked_dw", "triton", 0.4, tokens=8192, selection="strided"),  # no baseline for this case
               _op_record("masked_adamw", "torch", 9.0, dtype="torch.float32", params=1e9),
               _op_record("masked_adamw", "cuda", 1.0, dtype="torch.float32", params=1e9),
               _op_record("masked_adamw", "triton", 2.0, dtype="torch.float32", params=1e9),
               {**_op_record("masked_adamw", "cuda", 0.1, dtype="torch.float32", params=1e9), "device": "cpu"}]
    assert measured.derive(records) == {
        "score_edges": {"torch.bfloat16": ["triton", "torch"], "torch.float32": ["torch"]},
        "masked_adamw_": {"torch.float32": ["cuda", "triton", "torch"]}}
    assert measured.derive(records[:12]) == {  # masked dW: triton wins its one measured case
        "score_edges": {"torch.bfloat16": ["triton", "torch"], "torch.float32": ["torch"]},
        "masked_weight_grad": {"torch.bfloat16": ["triton", "torch"]}}
    # a Triton kernel's timings count for its current design only (kernel_version; 1 when absent)
    c = {"n": 32, "w": 64, "terms": 1, "c": 2048, "d": 2048}
    resid = [_op_record("residual_grads_op", "torch", 2.0, **c), _op_record("residual_grads_op", "triton", 1.0, **c)]
    assert measured.derive(resid, {"residual_grads": 1}) == {"residual_grads": {"torch.bfloat16": ["triton", "torch"]}}
    assert measured.derive(resid, {"residual_grads": 2}) == {"residual_grads": {"torch.bfloat16": ["torch"]}}
    resid[1]["kernel_version"] = 2
    assert measured.derive(resid, {"residual_grads": 2}) == {"residual_grads": {"torch.bfloat16": ["triton", "torch"]}}


def test_auto_on_a_gpu_follows_the_measured_order(monkeypatch):
    monkeypatch.delenv("CT_FAST_BACKEND", raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(measured, "_table", {"score_edges": {"torch.bfloat16": ["triton", "torch"],
                                                             "torch.float32": ["torch"]},
                                             "masked_adamw_": {"torch.float32": ["torch"]}})
    monkeypatch.setattr(measured, "_architectures", None)  # a table for any GPU
    if not torch.cuda.is_available():  # a CUDA build of ct_fast._C without a GPU: no kernel image to ask about
        monkeypatch.setattr(ops, "_cuda_image_error", lambda mod, device: None)
    triton_ok = ops.triton_available(cuda) is None
    assert ops.choose_backend("score_edges", cuda, (torch.bfloat16,)) == ("triton" if triton_ok else "torch")
    assert ops.choose_backend("score_edges", cuda, (torch.float32,)) == "torch"  # measured: no kernel beat torch
    assert ops.choose_backend("score_edges", cuda, (torch.float32, torch.bfloat16)) == "torch"  # mixed: defaults
    assert ops.choose_backend("masked_adamw_", cuda, {torch.float32}) == "torch"  # a kernel measured out of auto
    assert ops.choose_backend("score_edges", torch.device("cpu"), (torch.bfloat16,)) == "torch"  # CPU: unchanged
    monkeypatch.setattr(measured, "_table", {})
    assert ops.choose_backend("score_edges", cuda, (torch.bfloat16,)) == "torch"  # not measured: AUTO_SKIP
    # not measured: the default order, cuda (when ct_fast._C has CUDA: a CUDA torch with nvcc) before triton
    cuda_built = getattr(ops.native(), "WITH_CUDA", False)
    assert ops.choose_backend("masked_adamw_", cuda, {torch.float32}) == (
        "cuda" if cuda_built else "triton" if triton_ok else "torch")


def test_a_native_build_for_other_gpus_is_never_launched(monkeypatch):
    """``ct_fast._C`` built for other architectures than the GPU's (``TORCH_CUDA_ARCH_LIST``) would fail its launches
    inside a training step: ``auto`` takes the next backend, an explicit ``cuda`` names the GPU and the rebuild."""
    import types

    monkeypatch.delenv("CT_FAST_BACKEND", raising=False)
    asked = []
    fake = types.SimpleNamespace(WITH_CUDA=True, cuda_image_error=lambda index: asked.append(index) or
                                 "no kernel image is available for execution on the device")
    monkeypatch.setattr(ops, "_native", fake)
    monkeypatch.setattr(ops, "_image_errors", {})
    monkeypatch.setattr(measured, "_table", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    cuda = torch.device("cuda", 1)
    triton_ok = ops.triton_available(cuda) is None
    assert ops.choose_backend("masked_adamw_", cuda, {torch.float32}) == ("triton" if triton_ok else "torch")
    assert ops.choose_backend("masked_sgd_", cuda, {torch.bfloat16}) == "torch"  # Triton SGD: not in auto
    assert asked == [1]  # the build is asked once per device
    monkeypatch.setenv("CT_FAST_BACKEND", "cuda")
    with pytest.raises(CTFastError, match=r"no CUDA kernels for this GPU \(sm_89.*TORCH_CUDA_ARCH_LIST=8\.9 pip"):
        ops.choose_backend("masked_adamw_", cuda, {torch.float32})
    fake.cuda_image_error = lambda index: ""  # a build that has the GPU's code
    monkeypatch.setattr(ops, "_image_errors", {})
    assert ops.choose_backend("masked_adamw_", cuda, {torch.float32}) == "cuda"


def test_triton_older_than_the_kernels_compile_with_is_not_used(monkeypatch):
    """A Triton older than ``MIN_TRITON`` (the kernels are compiled for sm_90 with 3.3 to 3.9) is unavailable, with
    the reason: ``auto`` takes the next backend, ``CT_FAST_BACKEND=triton`` says to upgrade."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.2.0"))
    ops._triton_missing.cache_clear()
    try:
        why = ops.triton_available(torch.device("cuda"))
        assert why is not None and "triton 3.2.0 is older than 3.3" in why and "pip install -U triton" in why
        monkeypatch.setenv("CT_FAST_BACKEND", "triton")
        with pytest.raises(CTFastError, match="older than 3.3"):
            ops.choose_backend("masked_adamw_", torch.device("cuda"), {torch.float32})
        for version in ("3.3.1", "3.10.0", "4.0.0+git1234"):
            sys.modules["triton"].__version__ = version
            ops._triton_missing.cache_clear()
            assert ops.triton_available(torch.device("cuda")) is None
    finally:
        ops._triton_missing.cache_clear()


def test_committed_gpu_choices_match_the_committed_results():
    """``ct_fast/ops/gpu_choices.json`` is what ``measured.derive`` makes of ``bench/results/gpu_op_*.json``
    (``python bench/report.py`` regenerates it after a GPU run)."""
    import json
    import pathlib

    results = sorted((pathlib.Path(__file__).resolve().parents[1] / "bench" / "results").glob("gpu_op_*.json"))
    records = [r for p in results for r in json.loads(p.read_text())["results"]]
    committed = json.loads(pathlib.Path(measured.PATH).read_text())
    assert committed["choices"] == measured.derive(records), "stale: run python bench/report.py"
    tiles = sorted(results[0].parent.glob("gpu_tiles.json"))
    tile_records = [r for p in tiles for r in json.loads(p.read_text())["results"]]
    assert committed["tiles"] == measured.derive_tiles(tile_records, measured.tile_versions()), \
        "stale: run python bench/report.py"
    assert committed["products"] == measured.derive_products(records), "stale: run python bench/report.py"
    assert committed["sources"] == [p.name for p in results + tiles]
    assert committed["architectures"] == ["sm_90"]  # H100 / H200 timings


def test_a_gpu_check_runs_on_its_own_choices(monkeypatch, tmp_path):
    """``CT_FAST_GPU_CHOICES`` names the table ``auto`` reads instead of the committed one (the GPU check's later
    stages run on its own op timings)."""
    import json

    table = {"architectures": ["sm_90"], "choices": {"residual_grads": {"torch.bfloat16": ["triton", "torch"]}},
             "tiles": {"residual_grads": {"torch.bfloat16": {"NB": 8}}}, "products": {"torch.bfloat16": {"split": 8}}}
    (tmp_path / "run.json").write_text(json.dumps(table))
    monkeypatch.setenv("CT_FAST_GPU_CHOICES", str(tmp_path / "run.json"))
    monkeypatch.delenv("CT_FAST_PRODUCT_SPLIT", raising=False)
    for name in ("_table", "_tile_table", "_product_table"):
        monkeypatch.setattr(measured, name, None)
    monkeypatch.setattr(measured, "_architectures", measured._UNREAD)
    monkeypatch.setattr(measured, "device_architecture", lambda device: "sm_90")
    assert measured.gpu_order("residual_grads", (torch.bfloat16,), torch.device("cuda")) == ["triton", "torch"]
    assert measured.tiles("residual_grads", torch.bfloat16, torch.device("cuda")) == {"NB": 8}
    assert measured.product_split(torch.bfloat16, torch.device("cuda")) == 8


def test_measured_choices_hold_on_their_architecture_only(monkeypatch):
    """The committed timings choose kernels and tiles on GPUs of the architecture they were measured on; another
    GPU (an RTX 4090: sm_89, half the shared memory) keeps the default order and tiles."""
    monkeypatch.delenv("CT_FAST_BACKEND", raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(measured, "_table", {"score_edges": {"torch.bfloat16": ["triton", "torch"]}})
    monkeypatch.setattr(measured, "_tile_table", {"residual_grads": {"torch.bfloat16": {"NB": 2}}})
    monkeypatch.setattr(measured, "_architectures", {"sm_90"})
    triton_ok = ops.triton_available(cuda) is None
    for arch, measured_there in (("sm_90", True), ("sm_89", False), ("sm_100", False), (None, False)):
        monkeypatch.setattr(measured, "device_architecture", lambda device, a=arch: a)
        assert measured.applies_to(cuda) == measured_there
        assert measured.applies_to(None)  # no device: the measured GPU (what the planners model)
        assert ops.choose_backend("score_edges", cuda, (torch.bfloat16,)) == (
            "triton" if measured_there and triton_ok else "torch")  # elsewhere: AUTO_SKIP keeps the torch path
        assert measured.tiles("residual_grads", torch.bfloat16, cuda) == ({"NB": 2} if measured_there else {})
        assert measured.gpu_order("score_edges", (torch.bfloat16,)) == ["triton", "torch"]
    assert measured.architecture_of({"gpu": "NVIDIA H100 80GB HBM3"}) == "sm_90"
    assert measured.architecture_of({"gpu": "NVIDIA H200", "capability": "sm_90"}) == "sm_90"
    assert measured.architecture_of({"gpu": "NVIDIA GeForce RTX 4090", "capability": "sm_89"}) == "sm_89"
    assert measured.architecture_of({"gpu": "NVIDIA A100-SXM4-80GB"}) is None  # unknown without its capability
    assert measured.architecture_of({"gpu": None}) is None


def _tile_record(kernel, config, vs_default, dtype="torch.bfloat16", version=None, err=1e-3, device="cuda"):
    rec = {"bench": "tiles", "device": device, "dtype": dtype, "kernel": kernel, "config": config,
           "time_vs_default": vs_default, "ms": vs_default, "max_rel_err": err}
    return rec if version is None else {**rec, "kernel_version": version}


def test_gpu_tiles_are_derived_from_timings():
    """A tile variant replaces a Triton kernel's defaults on a GPU only where it beat them (by 3%) on every benchmark
    of the kernel, within the error band, timed on the kernel's current design; the fastest such wins."""
    versions = {"score_edges": 1, "residual_grads": 2}
    records = [
        _tile_record("score_edges", {}, 1.0), _tile_record("score_edges_layer", {}, 1.0),
        _tile_record("score_edges", {"num_warps": 4}, 0.9), _tile_record("score_edges_layer", {"num_warps": 4}, 0.99),
        _tile_record("score_edges", {"BT": 32}, 0.8), _tile_record("score_edges_layer", {"BT": 32}, 0.95),
        _tile_record("score_edges", {"BK": 32}, 0.5),  # not timed on the layer call
        _tile_record("residual_grads", {}, 1.0, version=2), _tile_record("residual_grads", {"NB": 48}, 0.7, version=2),
        _tile_record("residual_grads", {"BT": 128}, 0.5, version=2, err=0.5),  # outside the band
        _tile_record("residual_grads", {"BK": 128}, 0.4),  # the previous kernel's timing (no version: 1)
        _tile_record("residual_grads", {"NB": 8}, 0.6, version=2, device="cpu"),  # a rehearsal
        _tile_record("residual_grads", {"NB": 4}, 0.9, dtype="torch.float32", version=2, err=1e-6),
        _tile_record("residual_grads", {"NB": 2}, 0.99, dtype="torch.float16", version=2)]  # not 3% faster
    assert measured.derive_tiles(records, versions) == {
        "score_edges": {"torch.bfloat16": {"BT": 32}},
        "residual_grads": {"torch.bfloat16": {"NB": 48}, "torch.float32": {"NB": 4}}}
    assert measured.derive_tiles(records, {"score_edges": 2, "residual_grads": 3}) == {}  # both kernels rewritten


def _part(part, ms, dtype="torch.bfloat16", err=1e-3, device="cuda", rows=496):
    return {"bench": "score_edges_parts", "device": device, "dtype": dtype, "head_groups": 15, "heads": 32, "w": 64,
            "vector_groups": 16, "n_d": 98, "c": 2048, "d": 2048, "chunk": 256, "rows": rows, "part": part, "ms": ms,
            "max_rel_err": err}


def test_score_product_split_is_derived_from_timings(monkeypatch):
    """The torch scoring path splits its products over token blocks on a GPU only where a split beat the one GEMM
    (by 3%) in every measured case within the error band — the fastest such; ``CT_FAST_PRODUCT_SPLIT`` overrides
    it anywhere (a clear error for a bad value); elsewhere the product is one GEMM."""
    records = [_part("products", 1.0), _part("products_split8", 0.8), _part("products_split32", 0.6),
               _part("products", 1.0, rows=100), _part("products_split8", 0.9, rows=100),
               _part("products_split32", 1.2, rows=100),  # slower in this case: out
               _part("products_split8", 0.1, device="cpu"),  # a rehearsal
               _part("contributions", 0.5),
               _part("products", 1.0, "torch.float32", err=1e-7), _part("products_split8", 0.5, "torch.float32", err=1e-3),
               _part("products", 1.0, "torch.float16"), _part("products_split8", 0.99, "torch.float16")]  # not 3%
    assert measured.derive_products(records) == {"torch.bfloat16": {"split": 8}}  # fp32: outside its band
    monkeypatch.delenv("CT_FAST_PRODUCT_SPLIT", raising=False)
    monkeypatch.setattr(measured, "_product_table", {"torch.bfloat16": {"split": 8}})
    monkeypatch.setattr(measured, "_architectures", {"sm_90"})
    monkeypatch.setattr(measured, "device_architecture", lambda device: "sm_90")
    assert measured.product_split(torch.bfloat16, torch.device("cuda")) == 8
    assert measured.product_split(torch.bfloat16) == 8  # no device: the measured GPU (the launch counts)
    assert measured.product_split(torch.float32, torch.device("cuda")) == 1
    assert measured.product_split(torch.bfloat16, torch.device("cpu")) == 1
    monkeypatch.setattr(measured, "device_architecture", lambda device: "sm_89")  # another GPU: not its timings
    assert measured.product_split(torch.bfloat16, torch.device("cuda")) == 1
    monkeypatch.setenv("CT_FAST_PRODUCT_SPLIT", "4")
    assert measured.product_split(torch.float32, torch.device("cpu")) == 4
    for bad in ("0", "x", "-2"):
        monkeypatch.setenv("CT_FAST_PRODUCT_SPLIT", bad)
        with pytest.raises(CTFastError, match="CT_FAST_PRODUCT_SPLIT"):
            measured.product_split(torch.float32, torch.device("cpu"))


@pytest.mark.triton
@pytest.mark.skipif(ops.triton_available(torch.device("cpu")) is not None, reason="Triton cannot run here")
def test_residual_grads_launch_takes_the_measured_tiles(monkeypatch):
    """The launcher's tiles: its defaults, then the measured variant (a GPU's, faked here), then explicit overrides."""
    from ct_fast.kernels import residual_grads as launcher
    import importlib

    rg = importlib.import_module("ct_fast.kernels.residual_grads")
    assert measured.tiles("residual_grads", torch.bfloat16, torch.device("cpu")) == {}  # off a GPU: the defaults
    monkeypatch.setattr(measured, "_tile_table", {"residual_grads": {"torch.float32": {"NB": 2, "BT": 16, "dots": {
        "BT": 16}}}})
    monkeypatch.setattr(measured, "_architectures", None)  # tiles for any GPU
    assert measured.tiles("residual_grads", torch.float32, torch.device("cuda")) == {"NB": 2, "BT": 16,
                                                                                      "dots": {"BT": 16}}
    monkeypatch.setattr(measured, "tiles", lambda op, dtype, device: measured._tile_table[op].get(str(dtype), {}))
    grids = []
    for name in ("_residual_grads_kernel", "_norm_dots_kernel"):
        kernel = getattr(rg, name)
        monkeypatch.setattr(rg, name, type("Spy", (), {"__getitem__": lambda self, grid, k=kernel, n=name: (
            grids.append((n, grid)), k[grid])[1]})())
    g = _gen(3)
    n, c, d, w = 5, 40, 24, 8
    terms = [(torch.randn(c, n * w, generator=g), torch.randn(n, w, d, generator=g))]
    x, norm = torch.randn(c, d, generator=g), _norm("rmsnorm", d, g)
    mean, rstd, gamma = ops.reference.norm_stats(norm, x)
    out = launcher(terms, torch.empty(n, c, d), x, (mean, rstd), gamma, "rmsnorm")
    assert grids == [("_norm_dots_kernel", (3, n)), ("_residual_grads_kernel", (1, 3, 3))]  # BT 16, NB 2
    assert_close(out, ops.reference.residual_grads(terms, torch.empty(n, c, d), norm, x))
    grids.clear()
    launcher(terms, torch.empty(n, c, d), x, (mean, rstd), gamma, "rmsnorm", config={"NB": 5, "BK": 32})
    assert grids == [("_norm_dots_kernel", (3, n)), ("_residual_grads_kernel", (1, 3, 1))]  # overrides win


def test_native_build_is_present_in_ci():
    """CI builds ct_fast._C (CppExtension): a missing build must fail loudly, not silently run Python."""
    if os.environ.get("CI") != "true" or os.environ.get("CT_FAST_SKIP_NATIVE") == "1":
        pytest.skip("only enforced in CI")
    assert ops.native() is not None, ops.native_error()


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton), "cuda_emu"])
def test_tuner_step_same_with_every_backend(backend, monkeypatch):
    """A tuner step with each backend: the same circuit and the same parameters as the torch reference."""
    from ct_fast import CircuitAdamW, CircuitTuner
    from ct_fast.testing import random_batch, tiny_model

    if backend == "cpp" and ops.native() is None:
        pytest.skip(ops.native_error())
    if backend == "triton" and ops.triton_available(torch.device("cpu")):
        pytest.skip(ops.triton_available(torch.device("cpu")))
    if backend == "cuda_emu" and _emulation_missing():
        pytest.skip(_emulation_missing())
    results = {}
    for b in ("torch", backend):
        _use_backend(monkeypatch, b)
        model = tiny_model("llama")
        tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=20)
        r = [tuner.step(random_batch(37, seed=s)) for s in range(2)]
        results[b] = (model, r)
    (m0, r0), (m1, r1) = results["torch"], results[backend]
    for a, b in zip(r0, r1):
        assert [e[:2] for e in a.circuit.edges] == [e[:2] for e in b.circuit.edges]
    for (n, p), q in zip(m0.named_parameters(), m1.parameters()):
        assert_close(q, p, name=n)


@pytest.mark.parametrize("op", ["masked_adamw_", "masked_sgd_"])
@pytest.mark.parametrize("device,backend", _cases("masked_adamw_"))
def test_masked_updates_never_touch_unselected_lanes(op, device, backend, monkeypatch):
    """NaN-poison every unselected parameter row and state slot: after the op they are still NaN, bit for bit,
    and no NaN leaked into the selected rows."""
    full, views, grads, rows, slots, m, v, steps = _optimizer_case(11, torch.float32, device=device)
    for p, r, s, mm, vv in zip(views, rows, slots, m, v):
        keep_r = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
        keep_r[r] = True
        p[~keep_r] = float("nan")
        keep_s = torch.zeros(mm.shape[0], dtype=torch.bool, device=p.device)
        keep_s[s] = True
        mm[~keep_s] = float("nan")
        vv[~keep_s] = float("nan")
    before = [t.clone() for t in views + m + v]
    if op == "masked_adamw_":
        ops.masked_adamw_(views, grads, m, v, [], steps, rows, slots, 1e-2, 0.9, 0.99, 1e-8, 0.1, False)
    else:
        ops.masked_sgd_(views, grads, m, steps, rows, slots, 0.1, 0.9, 0.0, 0.01, False, False)
    after = views + m + v
    for b, a in zip(before, after):
        poisoned = torch.isnan(b)
        assert torch.isnan(a[poisoned]).all(), "an unselected lane was written"
        assert torch.isfinite(a[~poisoned]).all(), "NaN leaked into a selected lane"


# ---- optimizer hygiene: device lr, the non-finite skip flag, no host sync, CUDA-graph capture -------------------

def _opt_call(op, case, lr, found_inf=None):
    full, views, grads, rows, slots, m, v, steps = case
    if op == "masked_adamw_":
        ops.masked_adamw_(views, grads, m, v, [], steps, rows, slots, lr, 0.9, 0.99, 1e-8, 0.1, False,
                          found_inf=found_inf)
    else:
        ops.masked_sgd_(views, grads, m, steps, rows, slots, lr, 0.9, 0.1, 0.01, False, False, found_inf=found_inf)


def _state(case):
    full, _, _, _, _, m, v, steps = case
    return [t.clone() for t in full + m + v + steps]


def _assert_same(a, b, exact=True):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            _assert_param_close(x, y) if x.dtype != torch.float32 else assert_close(x, y)


OPT_CASES = [pytest.param(op, d, b, marks=p.marks, id=f"{op}-{p.id}") for op in ("masked_adamw_", "masked_sgd_")
             for p in _cases(op) for d, b in [p.values]]


@pytest.mark.parametrize("op,device,backend", OPT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lr_tensor_equals_float_lr(op, device, backend, dtype):
    """lr as a one-element device tensor (read by the kernel) gives the float-lr result within the dtype's band: as in
    torch, a float lr enters the bias correction and the decay as a double, a tensor lr as its fp32 value."""
    a, b = _optimizer_case(13, dtype, device=device), _optimizer_case(13, dtype, device=device)
    _opt_call(op, a, 1e-2)
    _opt_call(op, b, torch.tensor([1e-2], device=device))
    _assert_same(_state(a), _state(b), exact=False)


@pytest.mark.parametrize("op,device,backend", OPT_CASES)
@pytest.mark.parametrize("lr", ["float", "tensor"])
def test_default_betas_follow_torch(op, device, backend, lr):
    """torch's default betas (0.9, 0.999) and SGD's dampening: the kernels take ``1 - beta`` (and ``1 - lr * wd``,
    ``1 - dampening``) as torch does, worked out in double and rounded once, and the betas as doubles in the bias
    corrections — ``1 - float32(0.999)`` would be 1.3e-5 off, a bias on every second moment. Parameters and states
    within a few fp32 ulps of the torch reference (tolerances a 1.3e-5 relative error fails)."""
    case, ref = _optimizer_case(29, torch.float32, device=device), _optimizer_case(29, torch.float32, device=device)
    full, views, grads, rows, slots, m, v, steps = case
    r_full, r_views, _, _, _, r_m, r_v, r_steps = ref
    r_views = _views_like(r_full, views)
    for t in v + r_v:
        t.mul_(1e-3)  # second moments of the gradients' scale: the new term matters
    rate = 3e-3 if lr == "float" else torch.tensor([3e-3], device=device)
    if op == "masked_adamw_":
        args = (0.9, 0.999, 1e-8, 0.01, False)
        library.masked_adamw_default(r_views, grads, r_m, r_v, [], r_steps, rows, slots, rate, *args)
        ops.masked_adamw_(views, grads, m, v, [], steps, rows, slots, rate, *args)
    else:
        args = (0.9, 0.3, 0.01, False, False)
        library.masked_sgd_default(r_views, grads, r_m, r_steps, rows, slots, rate, *args)
        ops.masked_sgd_(views, grads, m, steps, rows, slots, rate, *args)
    atol = 1e-9 if op == "masked_adamw_" else 1e-8  # (SGD: a momentum buffer entry near zero by cancellation)
    for got, want in zip(full + m + v, r_full + r_m + r_v):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("op,device,backend", OPT_CASES)
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "preset", "finite"])
def test_found_inf_skips_the_whole_step(op, device, backend, poison):
    """A non-finite selected gradient (in any parameter) sets the flag and nothing is written — parameters, states,
    step counts; a flag already set on entry also skips; finite gradients and a clear flag give the plain step and
    leave the flag at 0."""
    case = _optimizer_case(17, torch.float32, device=device)
    grads = case[2]
    if poison in ("nan", "inf", "-inf"):
        grads[4][1, 2] = float(poison)  # the last parameter's second selected row
    before = _state(case)
    flag = torch.full((1,), 1.0 if poison == "preset" else 0.0, device=device)
    _opt_call(op, case, torch.tensor(1e-2, device=device), found_inf=flag)
    if poison == "finite":
        plain = _optimizer_case(17, torch.float32, device=device)
        _opt_call(op, plain, 1e-2)
        _assert_same(_state(case), _state(plain), exact=False)
        assert flag.item() == 0.0
    else:
        _assert_same(_state(case), before)
        assert flag.item() == 1.0


@pytest.mark.parametrize("device,backend", _cases("masked_adamw_"))
def test_nonfinite_flag_over_groups(device, backend):
    """Check every group's gradients first, then each group's update with the same flag: all groups or none."""
    a, b = _optimizer_case(19, torch.float32, device=device), _optimizer_case(23, torch.float32, device=device)
    b[2][0][0, 0] = float("nan")
    flag = torch.zeros(1, device=device)
    ops.nonfinite_flag_(a[2] + b[2], flag)
    before = _state(a)
    _opt_call("masked_adamw_", a, 1e-2, found_inf=flag)  # group a is finite, but the step is skipped
    _assert_same(_state(a), before)
    assert flag.item() == 1.0


@pytest.mark.parametrize("op,device,backend", OPT_CASES)
def test_masked_step_needs_no_host_value(op, device, backend):
    """With lr and the flag as device tensors, a masked step reads nothing back from the device."""
    from ct_fast.app import harness

    case = _optimizer_case(29, torch.float32, device=device)
    lr, flag = torch.tensor(1e-2, device=device), torch.zeros(1, device=device)
    _opt_call(op, case, lr, found_inf=flag)  # warm-up (Triton compiles)
    assert harness.count_host_syncs(lambda: _opt_call(op, case, lr, found_inf=flag))["total"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("op,device,backend", [c for c in OPT_CASES if c.values[1] == "cuda"])
def test_masked_step_captures_in_a_cuda_graph(op, device, backend):
    """A masked step with device lr and flag captured once and replayed equals the same steps run eagerly, including
    a changed lr between replays and a replay skipped by a non-finite gradient."""
    eager, static = _optimizer_case(31, torch.bfloat16, device=device), _optimizer_case(31, torch.bfloat16, device=device)
    lr_e, lr_s = torch.tensor(1e-2, device=device), torch.tensor(1e-2, device=device)
    flag_e, flag_s = torch.zeros(1, device=device), torch.zeros(1, device=device)
    warm = _optimizer_case(31, torch.bfloat16, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _opt_call(op, warm, lr_s, found_inf=torch.zeros(1, device=device))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _opt_call(op, static, lr_s, found_inf=flag_s)
    for lr, poison in ((1e-2, False), (5e-3, False), (5e-3, True), (2e-3, False)):
        for case, lr_t, flag in ((eager, lr_e, flag_e), (static, lr_s, flag_s)):
            lr_t.fill_(lr)
            flag.zero_()
            case[2][1][0, 0] = float("nan") if poison else 0.5
        _opt_call(op, eager, lr_e, found_inf=flag_e)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(flag_e, flag_s)
        _assert_same(_state(static), _state(eager))


def test_triton_launches_are_made_on_the_tensors_gpu(monkeypatch):
    """Triton launches on torch's current GPU: ``ops._on`` makes the tensors' GPU current around each launch (a
    model on cuda:1 driven from a thread whose current GPU is cuda:0), and is a no-op for CPU tensors and for the
    current GPU."""
    t = torch.zeros(2)
    assert ops._device_of([[t], 3.0]) == ops._device_of((1, t)) == t.device and ops._device_of((1.0, [])) is None
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = ops._on(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for device in (torch.device("cuda", 0), torch.device("cuda"), t.device, None):
        assert not isinstance(ops._on(device), torch.cuda.device)
