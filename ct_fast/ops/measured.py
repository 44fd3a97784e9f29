"""``auto``'s kernel choices on a GPU, from committed measurements.

A kernel joins ``auto`` on a GPU only when committed GPU timings show it faster than the torch path. The op
benchmarks that ``bench/gpu_check.sh`` runs on a GPU (``bench/results/gpu_op_*.json``) are reduced by
``derive`` to a table, committed as ``gpu_choices.json`` beside this file (``python bench/report.py``
regenerates it; a test checks it matches the committed results):

    {"score_edges": {"torch.bfloat16": ["triton", "torch"], "torch.float32": ["torch"]}, ...}

Per (op, dtype) the backends, fastest first (by their time relative to the torch path, summed over the cases),
that beat the torch path in every measured case of every benchmark of the op with an error within the dtype's
band, then ``torch`` — timings of a Triton kernel's current design only (``kernel_version``, as for the tiles
below): a rewritten kernel leaves ``auto`` until the GPU check has timed (and tested) it. An (op, dtype) the table
names runs the first of its list that can run the call; one it does not name keeps the default order
(``ops.AUTO_SKIP``). So a measurement can also take a kernel out of ``auto`` (an entry with ``torch`` alone).

Timings hold for the GPU architecture they were measured on: the table names the architectures of its sources
(``architectures``, e.g. ``["sm_90"]``), and a GPU of another architecture — whose shared memory, tensor cores and
bandwidth differ (an RTX 4090 has half an H100's shared memory per block: some Triton tiles would not even launch)
— keeps the default order and tiles.

The torch scoring path's product ``A @ G^T`` (``ops.score_edges_into``: a GEMM with a huge K, ``c * d``) follows
it too (``derive_products`` over the ``score_edges_parts`` records of ``gpu_op_score_edges.json``, the table's
``products``): where splitting K explicitly over ``s`` token blocks (one bmm, one sum) took at most ``TILE_GAIN`` of
the plain GEMM's time within the error band, the scorer splits its products so (``product_split``).

The Triton kernels' tiles follow the same rule (``derive_tiles`` over ``bench/results/gpu_tiles.json``, the
table's ``tiles``): a variant the GPU check timed faster than the default tiles on every benchmark of its kernel
replaces them there (``tiles``); the launchers' own defaults stand everywhere else.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_choices.json")

# bench record -> (op, time field, error field or None, the fields that name one measured case)
BENCHES = {
    "score_edges_op": ("score_edges", "ms", "max_rel_err", ("n_u", "w", "n_d", "c", "d")),
    "score_edges_layer": ("score_edges", "ms", "max_rel_err", ("head_groups", "heads", "w", "vector_groups", "n_d",
                                                               "c", "d")),
    "masked_dw": ("masked_weight_grad", "masked_ms", "max_rel_err_vs_torch", ("tokens", "d", "d_ff", "fraction",
                                                                             "selection")),
    "masked_adamw": ("masked_adamw_", "masked_ms", None, ("params", "fraction", "selection")),
    "residual_grads_op": ("residual_grads", "ms", "max_rel_err", ("n", "w", "terms", "c", "d")),
}
# largest error (relative to the largest value) a kernel may show to join auto: fp32 exact up to summation
# order; half-precision operands within their band (the torch path itself is ~1e-3 there)
ERROR_BAND = {"torch.float32": 1e-4, "torch.bfloat16": 2e-2, "torch.float16": 1e-2}

# GPUs of committed results that predate the ``capability`` field of their environment
KNOWN_ARCHITECTURES = {"H100": "sm_90", "H200": "sm_90", "GH200": "sm_90"}

_table: dict | None = None
_tile_table: dict | None = None
_product_table: dict | None = None
_UNREAD = object()
_architectures = _UNREAD  # the set of architectures the committed table applies on (None: any — a test's table)
_device_arch: dict = {}  # torch.device -> its architecture

# Triton kernels timed per tile variant (``bench_score_edges.py --tiles``): the op, and the benchmarks that time it
TILE_BENCHES = {"score_edges": ("score_edges", "score_edges_layer"), "residual_grads": ("residual_grads",)}
TILE_GAIN = 0.97  # a variant replaces the default tiles only when it took at most this share of their time


def derive(records: list[dict], versions: dict | None = None) -> dict:
    """``{op: {dtype: [backends fastest first..., "torch"]}}`` from GPU op-benchmark records (see module doc).
    ``versions``: the Triton kernels' current designs (``tile_versions()``): a Triton record of another version
    (``kernel_version``, 1 when absent) timed a kernel that is no more, and does not count."""
    versions = tile_versions() if versions is None else versions
    # (op, dtype) -> (bench, case) -> backend -> record: an op measured by several benches (score_edges: one block,
    # and a layer's chunk against many groups) must win in every case of every one
    cases: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        spec = BENCHES.get(r.get("bench"))
        if spec is None or not str(r.get("device", "")).startswith("cuda") or "skipped" in r:
            continue
        op, t_key, _, case_keys = spec
        if r.get(t_key) is None:
            continue
        if r.get("backend") == "triton" and r.get("kernel_version", 1) != versions.get(op, 1):
            continue  # an earlier design of the kernel
        cases[(op, r["dtype"])][(r["bench"], tuple(r.get(k) for k in case_keys))][r["backend"]] = r
    table: dict = {}
    for (op, dtype), by_case in sorted(cases.items()):
        if not all("torch" in per for per in by_case.values()):
            continue  # no baseline in some case: nothing to compare with
        band = ERROR_BAND.get(dtype, 0.0)
        totals = {}
        for b in {b for per in by_case.values() for b in per} - {"torch"}:
            runs = [(per.get(b), per["torch"], BENCHES[bench]) for (bench, _), per in by_case.items()]
            if any(r is None or r[t] >= base[t] for r, base, (_, t, _, _) in runs):
                continue  # missing somewhere, or not faster everywhere
            if any(e is not None and not (r.get(e, float("inf")) <= band) for r, _, (_, _, e, _) in runs):
                continue  # outside the dtype's error band (NaN included)
            totals[b] = sum(r[t] / base[t] for r, base, (_, t, _, _) in runs)  # time relative to torch, summed
        table.setdefault(op, {})[dtype] = sorted(totals, key=totals.get) + ["torch"]
    return table


def tile_versions() -> dict:
    """Each tile-timed Triton kernel's current design: its module's ``TILES_VERSION`` (imports Triton)."""
    import importlib

    return {op: importlib.import_module(f"ct_fast.kernels.{op}").TILES_VERSION for op in TILE_BENCHES}


def derive_tiles(records: list[dict], versions: dict) -> dict:
    """``{op: {dtype: config}}``: per Triton kernel and operand dtype, the tile variant that beat the default tiles
    (``time_vs_default <= TILE_GAIN``) on every benchmark of the kernel (``TILE_BENCHES``), within the dtype's error
    band — the fastest such by the summed time over the default's. Only records of the kernel's current design
    count (``kernel_version`` equal to ``versions[op]``, the kernel module's ``TILES_VERSION``; a record without one
    is version 1): a rewritten kernel's tiles mean something else. A kernel no variant beat is not named (its
    launcher's defaults stand)."""
    timed: dict = defaultdict(lambda: defaultdict(dict))  # (op, dtype) -> config -> bench kernel -> record
    benches: dict = defaultdict(set)  # (op, dtype) -> the bench kernels that timed it
    for r in records:
        op = next((o for o, names in TILE_BENCHES.items() if r.get("kernel") in names), None)
        if (r.get("bench") != "tiles" or op is None or not str(r.get("device", "")).startswith("cuda")
                or "skipped" in r or r.get("time_vs_default") is None
                or r.get("kernel_version", 1) != versions.get(op)):
            continue
        key = (op, r["dtype"])
        benches[key].add(r["kernel"])
        timed[key][json.dumps(r["config"], sort_keys=True)][r["kernel"]] = r
    table: dict = {}
    for (op, dtype), by_config in sorted(timed.items()):
        band = ERROR_BAND.get(dtype, 0.0)
        totals = {}
        for config, per in by_config.items():
            if (config != "{}" and set(per) == benches[(op, dtype)]
                    and all(r["time_vs_default"] <= TILE_GAIN and r.get("max_rel_err", 0.0) <= band
                            for r in per.values())):
                totals[config] = sum(r["time_vs_default"] for r in per.values())
        if totals:
            table.setdefault(op, {})[dtype] = json.loads(min(totals, key=totals.get))
    return table


def derive_products(records: list[dict]) -> dict:
    """``{dtype: {"split": s}}``: per operand dtype, the explicit split of the torch path's score product
    (``products_split{s}`` of ``bench_score_edges.run_torch_parts``) that beat the plain GEMM (``products``) in
    every measured case — at most ``TILE_GAIN`` of its time, within the dtype's error band — the fastest such by
    the summed time over the GEMM's. A dtype no split beat is not named (the product is one GEMM)."""
    cases: dict = defaultdict(lambda: defaultdict(dict))  # dtype -> case -> part -> record
    for r in records:
        if (r.get("bench") != "score_edges_parts" or not str(r.get("device", "")).startswith("cuda")
                or "skipped" in r or r.get("ms") is None):
            continue
        case = tuple(r.get(k) for k in ("head_groups", "heads", "w", "vector_groups", "n_d", "chunk", "rows", "d"))
        cases[r["dtype"]][case][r["part"]] = r
    table: dict = {}
    for dtype, by_case in sorted(cases.items()):
        band, totals = ERROR_BAND.get(dtype, 0.0), {}
        parts = {p for per in by_case.values() for p in per if p.startswith("products_split")}
        for part in parts:
            runs = [(per.get(part), per.get("products")) for per in by_case.values()]
            if all(r is not None and base is not None and r["ms"] <= TILE_GAIN * base["ms"]
                   and r.get("max_rel_err", 0.0) <= band for r, base in runs):
                totals[int(part[len("products_split"):])] = sum(r["ms"] / base["ms"] for r, base in runs)
        if totals:
            table[dtype] = {"split": min(totals, key=totals.get)}
    return table


def product_split(dtype, device=None) -> int:
    """Token blocks the torch scoring path splits each score product into (1: one GEMM): ``CT_FAST_PRODUCT_SPLIT``
    where set (any device: the tests), else the measured ``derive_products`` choice on a GPU of the architecture it
    was measured on (``device`` None: the measured GPU — what the launch counts model)."""
    env = os.environ.get("CT_FAST_PRODUCT_SPLIT")
    if env:
        if not env.isdigit() or int(env) < 1:
            from ..errors import CTFastError

            raise CTFastError(f"CT_FAST_PRODUCT_SPLIT={env!r}: set a whole number of token blocks >= 1 (1: no split)")
        return int(env)
    if device is not None and (getattr(device, "type", device) != "cuda" or not applies_to(device)):
        return 1
    global _product_table
    if _product_table is None:
        _product_table = _read().get("products", {})
    return int(_product_table.get(str(dtype), {}).get("split", 1))


def architecture_of(env: dict) -> str | None:
    """The GPU architecture (``"sm_90"``) a result's environment was measured on, or None (no GPU, or unknown)."""
    if env.get("capability"):
        return env["capability"]
    words = (env.get("gpu") or "").split()
    return next((arch for name, arch in KNOWN_ARCHITECTURES.items() if name in words), None)


def device_architecture(device) -> str | None:
    """``"sm_<major><minor>"`` of a CUDA device (None without CUDA); read once per device (a tensor's device has
    its index: this runs at every op dispatch)."""
    arch = _device_arch.get(device, _UNREAD)
    if arch is _UNREAD:
        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index
        arch = "sm_{}{}".format(*torch.cuda.get_device_capability(torch.cuda.current_device() if index is None
                                                                    else index))
        if index is not None:
            _device_arch[device] = arch
    return arch


def _read() -> dict:
    """The committed table, or the one ``CT_FAST_GPU_CHOICES`` names (a GPU check's later stages run on its own
    op timings)."""
    try:
        with open(os.environ.get("CT_FAST_GPU_CHOICES") or PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def load() -> dict:
    """The committed table (empty when no GPU results are committed), read once."""
    global _table
    if _table is None:
        _table = _read().get("choices", {})
    return _table


def applies_to(device) -> bool:
    """Whether the committed timings hold on ``device``: a GPU of an architecture they were measured on (None: the
    GPU they were measured on — what the planners and launch counts model)."""
    global _architectures
    if _architectures is _UNREAD:
        _architectures = set(_read().get("architectures", ()))
    return device is None or _architectures is None or device_architecture(device) in _architectures


def tiles(op: str, dtype, device) -> dict:
    """The measured tile variant of Triton kernel ``op`` for operands of ``dtype`` on ``device`` (a GPU), or ``{}``:
    the launcher's defaults (off a GPU, on another architecture than the timings', or where no variant beat them)."""
    global _tile_table
    if getattr(device, "type", device) != "cuda" or not applies_to(device):
        return {}
    if _tile_table is None:
        _tile_table = _read().get("tiles", {})
    return dict(_tile_table.get(op, {}).get(str(dtype), {}))


def gpu_order(op: str, dtypes, device=None) -> list[str] | None:
    """The measured backend order for ``op`` on a GPU (``device``; None: the measured one) with operands of
    ``dtypes``, or None: not measured, measured on another architecture, or the dtypes' orders differ (mixed
    operands were not measured)."""
    if not applies_to(device):
        return None
    orders = {tuple(load().get(op, {}).get(str(d)) or ()) for d in dtypes}
    if len(orders) != 1:
        return None
    return list(orders.pop()) or None
