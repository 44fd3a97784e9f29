"""Triton fused attribution scoring: ``S[u, n] += sum_t (delta[t, u] @ W[u]) . G[n, t]``, on tensor cores.

Program (block of BU upstream nodes, block of BN downstream nodes, token split). Per token block (BT) and
d_model block (BK):

1. the upstream nodes' residual contributions ``a[u] = delta[t-block, u*w:(u+1)*w] @ W[u][:, k-block]`` — one
   batched dot ``[BU, BT, BW] x [BU, BW, BK]`` kept in registers (``W=None``: ``delta`` already is the single
   node's contribution, w = d);
2. their products with the downstream gradients, as a second dot over the flattened (token, d) block, transposed
   so that its M dimension is the (up to 64) downstream nodes — a Hopper ``wgmma`` needs M >= 64:
   ``acc[BN, BU] += G[n-block, t-block, k-block] (loaded as [BN, BT*BK]) @ a.reshape(BU, BT*BK).T``.

One launch covers many upstream groups (``score_edges_into``: all the head groups of one width, or all the
residual vectors, read from a table), its programs ordered so that the groups running side by side read the same
G tiles. Neither the per-node contributions ``[n_u, tokens, d]`` nor any product is written to memory. Operands stay in
the input dtype — bf16/fp16 on tensor cores (the contribution rounded to it between the two dots, as the torch
path rounds its contribution block), fp32 as IEEE fp32 dots — and accumulation is fp32. Each token split writes
its own ``[n_u, n_d]`` partial, summed afterwards in a fixed order: no atomics, so the scores (and the circuit
they select) are the same bits on every run.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _score_edges_kernel(table_ptr, g_ptr, s_ptr, n_vec, w, n_d, c, d, tokens_per_split, split_stride,
                        HAS_W: tl.constexpr,  # heads (z @ W) or residual vectors (the rows themselves)
                        OP: tl.constexpr,  # the operand dtype: the contribution is rounded to it between the dots
                        FP32_DOTS: tl.constexpr,  # dots on fp32 operands, IEEE (fp32 inputs; bf16 when interpreted)
                        ALIGN: tl.constexpr,  # elements every table address, row stride and d are multiples of
                        EVEN_U: tl.constexpr,  # every block holds BU heads/vectors: no upstream mask
                        BU: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """One launch scores many upstream groups (``table_ptr``, int64 rows built by ``_tables``):

    - ``HAS_W``: program_id(0) is one block of up to BU heads of one group, its row ``[z offset, W offset,
      heads in the group, first head of the block, score row of the group's head 0]`` (``z`` ``[c, n_u * w]``,
      ``W`` ``[n_u, w, d]``, both contiguous; one head width ``w`` per launch);
    - else: program_id(0) covers residual vectors ``pid * BU ...`` of ``n_vec``, a row ``[offset, score row]``
      each (``[c, d]`` contiguous rows).

    Offsets are in elements from ``g_ptr`` (any sign): a pointer made from G's keeps what the compiler knows of
    its alignment (an address loaded as an integer would not), so the loads vectorise.

    Programs of one (downstream block, token split) are adjacent in launch order: the groups' blocks running
    together read the same G tiles (from L2 once one of them has)."""
    pid = tl.program_id(0)
    n_offs = tl.program_id(1) * BN + tl.arange(0, BN)
    t_begin = tl.program_id(2) * tokens_per_split
    n_mask = n_offs < n_d
    i_offs = tl.arange(0, BW)
    if HAS_W:
        row = table_ptr + pid * 5
        z_ptr = g_ptr + tl.multiple_of(tl.load(row), ALIGN)  # element offsets from G: G's alignment carries over
        w_ptr = g_ptr + tl.multiple_of(tl.load(row + 1), ALIGN)
        n_u = tl.load(row + 2).to(tl.int32)
        u_offs = tl.load(row + 3).to(tl.int32) + tl.arange(0, BU)
        rows = tl.load(row + 4).to(tl.int32) + u_offs
        z_stride = tl.multiple_of(n_u * w, ALIGN)  # z's row stride (elements)
        u_mask = u_offs < n_u
    else:
        u_offs = pid * BU + tl.arange(0, BU)
        u_mask = u_offs < n_vec
        v_offs = tl.multiple_of(tl.load(table_ptr + u_offs * 2, mask=u_mask, other=0), ALIGN)
        rows = tl.load(table_ptr + u_offs * 2 + 1, mask=u_mask, other=0).to(tl.int32)
    if EVEN_U:  # a compile-time true mask: the loads share one predicate instead of one per head (sm_90: 173
        u_mask = tl.full((BU,), 1, tl.int1)  # registers where the runtime mask took 208)
    acc = tl.zeros((BN, BU), dtype=tl.float32)  # transposed: M = downstream nodes, so the second dot is a wgmma
    j = tl.arange(0, BT * BK)  # the flattened (token, d_model) index of one tile
    for t0 in range(0, tokens_per_split, BT):  # tokens_per_split: a multiple of BT
        t_offs = (t_begin + t0 + tl.arange(0, BT)).to(tl.int64)  # 64-bit offsets: G may hold over 2^31 elements
        t_mask = t_offs < c
        j_t = t_begin + t0 + j // BK
        if HAS_W:  # [BU, BT, BW]: each upstream head's activations
            z = tl.load(z_ptr + t_offs[None, :, None] * z_stride + u_offs[:, None, None] * w + i_offs[None, None, :],
                        mask=u_mask[:, None, None] & t_mask[None, :, None] & (i_offs[None, None, :] < w), other=0.0)
        for k0 in range(0, d, BK):
            k_offs = k0 + tl.arange(0, BK)
            k_mask = k_offs < d
            if HAS_W:
                wt = tl.load(w_ptr + u_offs[:, None, None] * (w * d) + i_offs[None, :, None] * d
                             + k_offs[None, None, :],
                             mask=u_mask[:, None, None] & (i_offs[None, :, None] < w) & k_mask[None, None, :],
                             other=0.0)
                if FP32_DOTS:
                    a = tl.dot(z.to(tl.float32), wt.to(tl.float32), input_precision="ieee")  # [BU, BT, BK]
                else:
                    a = tl.dot(z, wt)  # tensor cores, fp32 accumulation
            else:  # [BU, BT, BK]: each vector's own rows
                a = tl.load(g_ptr + v_offs[:, None, None] + t_offs[None, :, None] * d + k_offs[None, None, :],
                            mask=u_mask[:, None, None] & t_mask[None, :, None] & k_mask[None, None, :], other=0.0)
            # [BN, BT*BK], loaded flat (no reshape of a 3-D tile, which is a register-layout conversion)
            j_k = k0 + j % BK
            g2 = tl.load(g_ptr + n_offs[:, None].to(tl.int64) * c * d + j_t[None, :].to(tl.int64) * d + j_k[None, :],
                         mask=n_mask[:, None] & (j_t < c)[None, :] & (j_k < d)[None, :], other=0.0)
            a2 = tl.trans(tl.reshape(a.to(OP), (BU, BT * BK)))  # [BT*BK, BU], token-major as g2's columns
            if FP32_DOTS:
                acc += tl.dot(g2.to(tl.float32), a2.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(g2, a2)
    s_ptr += tl.program_id(2).to(tl.int64) * split_stride  # this split's partial
    tl.store(s_ptr + rows[None, :] * n_d + n_offs[:, None], acc, mask=u_mask[None, :] & n_mask[:, None])


@triton.jit
def _accumulate_partials_kernel(p_ptr, out_ptr, splits, n, n_cols, out_row_stride, out_col_stride, alpha,
                                BLOCK: tl.constexpr):
    """``out[i, j] += alpha * sum_s P[s, i, j]`` over the flat ``[n = rows * n_cols]`` index, splits summed in
    order (the same bits every run); ``out`` any 2-D strides (a block of a larger score matrix)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        total += tl.load(p_ptr + s * n + offs, mask=mask, other=0.0)
    where = out_ptr + (offs // n_cols) * out_row_stride + (offs % n_cols) * out_col_stride
    tl.store(where, tl.load(where, mask=mask, other=0.0) + alpha * total, mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# the kernel's design, for its tile timings (bench_score_edges.py --tiles -> ct_fast.ops.measured.derive_tiles)
TILES_VERSION = 1


def max_head_width(dtype: torch.dtype) -> int:
    """The widest upstream head the kernel takes (the whole ``[BU, BT, BW]`` head tile is loaded at once): 128 for
    bf16/fp16 (Llama-3-8B's heads; 2 pipeline stages keep it at 200 KiB of shared memory), 64 for fp32 (256 KiB at
    128, over an H100's 227 KiB). ``ct_fast.ops.score_edges`` runs wider heads (an unsplit MLP) on the torch path."""
    return 64 if dtype == torch.float32 else 128


def tile_config(dtype: torch.dtype, head_width: int = 64) -> dict:
    """Tiles, warps and pipeline depth per operand dtype (``tl.dot`` needs every dimension >= 16); ``BN`` is an upper
    bound (the launcher takes the smallest power of two >= 16 covering the downstream nodes). 64 downstream nodes per
    program cover one layer of a 1B-8B Llama (49 nodes), so each contribution is produced once per layer read (16-node
    blocks did it 4x over). What ``bench/triton_sm90.py`` reads from the sm_90 cubins (Triton 3.6 and 3.9, launch
    arguments specialised as the JIT does): bf16 — the second dot on ``wgmma``, the first (per-head, batched) on
    ``mma.sync``, no stack frame, 200 KiB shared memory with 3 stages; fp32 — 144 KiB (smaller d_model blocks and no
    pipelining keep it within an H100's 227 KiB)."""
    if dtype == torch.float32:
        return dict(BU=16, BN=64, BT=16, BK=16, num_warps=8, num_stages=1)
    return dict(BU=16, BN=64, BT=16, BK=16, num_warps=8, num_stages=3 if head_width <= 64 else 2)


def _prepare(delta, up_weight, dt):
    """``(delta, W, n_u, w)`` in the operand dtype, contiguous; refuses heads wider than the tile."""
    delta = delta.to(dt).contiguous()
    if up_weight is None:
        return delta, None, 1, None
    up_weight = up_weight.to(dt).contiguous()
    n_u, w = up_weight.shape[0], up_weight.shape[1]
    if w > max_head_width(dt):
        raise ValueError(f"score_edges kernel: heads of width {w} > {max_head_width(dt)} for {dt} (the torch path "
                         "runs them: ct_fast.ops.score_edges routes them there)")
    return delta, up_weight, n_u, w


def _tables(groups, vectors, base, BU):
    """The launches' int64 tables in one tensor on ``base``'s device (one host-to-device copy, from pinned memory:
    no sync): a ``[z, W, n_u, u0, row0]`` row per block of BU heads of each head group, then ``[v, row]`` per
    residual vector, tensors as element offsets from ``base``. Returns ``(table, (first element, blocks) per head
    width, where the vectors' rows start)``."""
    size, at = base.element_size(), base.data_ptr()

    def offset(t):
        gap = t.data_ptr() - at
        if gap % size:
            raise ValueError("score_edges kernel: an operand's address is not a whole number of elements from G's")
        return gap // size

    flat, blocks = [], {}
    for w, items in groups.items():
        start = len(flat)
        for z, W, n_u, row0 in items:
            for u0 in range(0, n_u, BU):
                flat += [offset(z), offset(W), n_u, u0, row0]
        blocks[w] = (start, (len(flat) - start) // 5)
    vec_at = len(flat)
    for v, row in vectors:
        flat += [offset(v), row]
    table = torch.tensor(flat, dtype=torch.int64)
    if base.device.type == "cuda":
        table = table.pin_memory().to(base.device, non_blocking=True)
    return table, blocks, vec_at


def _alignment(tensors, dt) -> int:
    """Elements that every address and row stride of ``tensors`` are multiples of: 16 bytes' worth (the loads
    vectorise), else 1."""
    per16 = 16 // dt.itemsize
    ok = all(t.data_ptr() % 16 == 0 and all(s % per16 == 0 for s in t.stride()[:-1]) for t in tensors)
    return per16 if ok else 1


def token_splits(c: int, BT: int) -> tuple[int, int]:
    """``(splits, tokens per split)`` of a ``c``-row block: up to 64 programs along the tokens, each a multiple
    of the BT tile, none empty."""
    per_split = triton.cdiv(triton.cdiv(c, max(1, min(triton.cdiv(c, BT), 64))), BT) * BT
    return triton.cdiv(c, per_split), per_split


def score_edges(delta, up_weight, grad_down, config=None):
    """Launcher with the signature of ``torch.ops.ct_fast.score_edges``: fp32 ``[n_u, n_d]``.

    Operands in ``grad_down``'s dtype (fp32, bf16 or fp16; ``delta``/``up_weight`` are cast to it, as the torch
    path does), fp32 accumulation. Under ``TRITON_INTERPRET=1`` bf16 dots run on fp32 copies of the (bf16) operands:
    the interpreter's bf16 ``tl.dot`` reads the raw bits as integers (a 16x16 check: 1e10 for values of order 1),
    and the exact products of bf16 values with fp32 accumulation are what tensor cores compute."""
    n_u = 1 if up_weight is None else up_weight.shape[0]
    out = torch.zeros(n_u, grad_down.shape[0], dtype=torch.float32, device=grad_down.device)
    return score_edges_into(out, [(delta, up_weight)], grad_down, config=config)


def score_edges_into(out, sources, grad_down, alpha=1.0, config=None):
    """``out += alpha * [score_edges(delta, W, grad_down) for (delta, W) in sources]`` stacked by rows: one layer's
    gradient block scored against many upstream groups — one kernel launch for all the head groups (per head
    width), one for all the residual vectors, then one reduction that sums the token splits (fixed order: the
    same bits every run) into ``out`` (fp32 ``[sum n_u, n_d]``, any strides; a block of the score matrix). The
    groups' programs run side by side, so the G tiles they share are read from memory about once per launch,
    not once per group."""
    dt = grad_down.dtype
    grad_down = grad_down.contiguous()
    n_d, c, d = grad_down.shape
    prepared = [_prepare(delta, up_weight, dt) for delta, up_weight in sources]
    rows = sum(n_u for _, _, n_u, _ in prepared)
    if out.shape != (rows, n_d) or out.dtype != torch.float32:
        raise ValueError(f"score_edges_into: out is {tuple(out.shape)} {out.dtype}, the sources score "
                         f"[{rows}, {n_d}] fp32")
    if rows == 0 or n_d == 0 or c == 0:
        return out
    from ..ops import measured

    # the defaults, the variant committed GPU timings chose (on a GPU), tile overrides (bench_score_edges.py --tiles)
    config = {**measured.tiles("score_edges", dt, out.device), **(config or {})}
    cfg = {**tile_config(dt), **config}
    groups, vectors, r = {}, [], 0
    for delta, up_weight, n_u, w in prepared:
        if up_weight is None:
            vectors.append((delta, r))
        else:
            groups.setdefault(w, []).append((delta, up_weight, n_u, r))
        r += n_u
    table, blocks, vec_at = _tables(groups, vectors, grad_down, cfg["BU"])
    BT = cfg["BT"]
    splits, per_split = token_splits(c, BT)
    partials = torch.empty(splits, rows, n_d, dtype=torch.float32, device=out.device)  # every element written
    BN = min(cfg["BN"], max(16, triton.next_power_of_2(n_d)))  # no work on absent downstream rows
    align = _alignment([grad_down, *[t for x in prepared for t in x[:2] if t is not None]], dt)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    common = dict(OP=_TL_DTYPES[dt], FP32_DOTS=dt == torch.float32 or (interpreted and dt == torch.bfloat16),
                  ALIGN=align, BU=cfg["BU"], BN=BN, BT=BT, BK=cfg["BK"], num_warps=cfg["num_warps"])
    for w, (first, n_blocks) in blocks.items():
        BW = max(16, triton.next_power_of_2(w))
        stages = {**tile_config(dt, BW), **config}["num_stages"]
        even = all(n_u % cfg["BU"] == 0 for _, _, n_u, _ in groups[w])
        _score_edges_kernel[(n_blocks, triton.cdiv(n_d, BN), splits)](
            table[first:], grad_down, partials, 0, w, n_d, c, d, per_split, partials.stride(0), HAS_W=True, BW=BW,
            EVEN_U=even, num_stages=stages, **common)
    if vectors:
        _score_edges_kernel[(triton.cdiv(len(vectors), cfg["BU"]), triton.cdiv(n_d, BN), splits)](
            table[vec_at:], grad_down, partials, len(vectors), d, n_d, c, d, per_split, partials.stride(0),
            HAS_W=False, BW=16, EVEN_U=len(vectors) % cfg["BU"] == 0, num_stages=cfg["num_stages"], **common)
    n, BLOCK = rows * n_d, 1024
    _accumulate_partials_kernel[(triton.cdiv(n, BLOCK),)](partials, out, splits, n, n_d, out.stride(0),
                                                          out.stride(1), float(alpha), BLOCK=BLOCK)
    return out
