"""The GPU targets of the device check, read off one run's JSON (every ratio from the same run, so the same GPU).

    python bench/targets.py [DIR]   # DIR: a GPU check's output ($OUT; default bench/results/gpu_check)

``bench/gpu_check.py`` prints this table last and writes it to ``targets.json``. Each target takes the best backend
of the run (``auto`` follows the measured order, so the best measured backend is what a step would get); a reading
taken on a CPU (the rehearsal) is shown but never counted as met.
"""

from __future__ import annotations

import json
import os
import sys


def _load(out: str, name: str) -> list[dict]:
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in json.load(f).get("results", []) if "skipped" not in r]


def _row(target: str, op: str, limit: float, recs: list[dict], key: str, best=min, where=lambda r: "") -> dict:
    """The best of ``recs[key]`` against ``limit`` (``op``: ``<=`` or ``>=``)."""
    recs = [r for r in recs if r.get(key) is not None]
    if not recs:
        return {"target": target, "limit": f"{op} {limit:g}", "value": None, "where": "", "status": "no data"}
    r = best(recs, key=lambda r: r[key])
    ok = r[key] <= limit if op == "<=" else r[key] >= limit
    status = ("met" if ok else "missed") if r.get("device", "cuda") != "cpu" else "CPU reading (not a target)"
    return {"target": target, "limit": f"{op} {limit:g}", "value": r[key], "where": where(r), "status": status}


def _by(recs: list[dict], *keys) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups


REFRESH_PERIOD = {"circuit_refresh10": 10}  # a method's steps per refresh: its timed steps must span one


def _in_band(r: dict, key: str) -> bool:
    """Whether a kernel record's error against the reference is within its dtype's band (as auto requires)."""
    from ct_fast.ops.measured import ERROR_BAND

    err = r.get(key)
    return err is None or err <= ERROR_BAND.get(str(r.get("dtype")), 0.0)


def _dt(r: dict) -> str:
    return str(r.get("dtype", "")).replace("torch.", "")


def evaluate(out: str) -> list[dict]:
    """One row per target (and dtype / shape where the run has several): value, limit, status."""
    rows = []
    adamw = [r for r in _load(out, "op_masked_adamw") if r["bench"] == "masked_adamw"]
    for (dtype, sel), recs in sorted(_by(adamw, "dtype", "selection").items(), key=str) or [((None, None), [])]:
        name = (f"masked AdamW, {100 * recs[0]['fraction']:.0f}% circuit" + (f" ({sel})" if sel else "")
                if recs else "masked AdamW")
        where = lambda r: f"{r['backend']}, {_dt(r)}, {r['params']:.2g} params"  # noqa: E731
        rows.append(_row(f"{name}: share of copy bandwidth", ">=", 0.8, recs, "fraction_of_copy_bw", max, where))
        rows.append(_row(f"{name}: time / fused dense AdamW", "<=", 0.1, recs, "ratio_to_dense", min, where))
        rows.append(_row(f"{name}, whole step in a CUDA graph: time / fused dense AdamW", "<=", 0.1, recs,
                         "graph_ratio_to_dense", min, where))
    scoring = _load(out, "op_score_edges")
    # a kernel is as fast as its slower case: the one block and the scorer's own call (a layer against many groups) —
    # auto takes it only where it wins both (ct_fast.ops.measured.derive), within its dtype's error band
    cases = [r for r in scoring if r["bench"] in ("score_edges_op", "score_edges_layer") and r["backend"] != "torch"
             and r.get("time_vs_torch") is not None and _in_band(r, "max_rel_err")]
    worst = [{**max(recs, key=lambda r: r["time_vs_torch"]), "cases": len(recs)}
             for recs in _by(cases, "dtype", "backend").values()]
    for (dtype,), recs in sorted(_by(worst, "dtype").items()) or [((None,), [])]:
        rows.append(_row(f"score_edges kernel{', ' + _dt(recs[0]) if recs else ''}: time / torch path (its slower of "
                         "one block and a layer)", "<=", 1.0, recs, "time_vs_torch", min,
                         lambda r: f"{r['backend']}, {r['bench'].removeprefix('score_edges_')}, {r['c']} tokens, "
                                   f"d {r['d']}"))
    engine = [r for r in scoring if r["bench"] == "score_edges"]
    rows.append(_row("attribution: materialising EAP's memory / ours (above the activation backward both run)", ">=",
                     10, engine, "overhead_ratio", max,
                     lambda r: f"{r['layers']} layers x {r['heads']} heads, d_model {r['d_model']}, "
                               f"{r['tokens']} tokens"))
    dw = [r for r in _load(out, "op_masked_dw") if r["bench"] == "masked_dw" and _in_band(r, "max_rel_err_vs_torch")]
    for (dtype, sel, frac), recs in sorted(_by(dw, "dtype", "selection", "fraction").items()) or [((None,) * 3, [])]:
        label = f"masked dW, {100 * frac:.0f}% rows ({sel}, {_dt(recs[0])})" if recs else "masked dW"
        rows.append(_row(f"{label}: time / dense dW", "<=", 0.15, recs, "ratio_to_dense", min,
                         lambda r: f"{r['backend']}, {r['tokens']} tokens, d {r['d']}"))
    steps = [r for r in _load(out, "step") if r["bench"] == "step"]
    for (model, dtype), recs in sorted(_by(steps, "model", "dtype").items()) or [((None, None), [])]:
        full = next((r["mean_ms"] for r in recs if r["method"] == "full"), None)
        for method, label, limit in (("circuit_refresh1", "faithful (refresh 1)", 1.5),
                                     ("circuit_refresh10", "refresh 10", 0.9)):
            mine = [{**r, "vs_full": r["mean_ms"] / full if full else None} for r in recs if r["method"] == method
                    and r.get("steps", 1) >= REFRESH_PERIOD.get(method, 1)]  # (refresh 10: amortised over 10)
            rows.append(_row(f"{model} {dtype} step: {label} / full fine-tuning" if recs else f"step: {label} / full",
                             "<=", limit, mine, "vs_full", min, _step_where))
    return rows


def _step_where(r: dict) -> str:
    """A step record's shape, and the share of parameters its circuits tuned over the timed steps (each method
    selects its own circuits: a ratio read at another circuit size is another measurement)."""
    where = f"batch {r['batch']} x {r['seq']}"
    fractions = r.get("tuned_param_fractions")
    if fractions:
        where += f", circuit {100 * min(fractions):.1f}-{100 * max(fractions):.1f}% of params"
    return where


def phase_table(out: str) -> str:
    """The step benchmark's phase split per tuner method: device ms / host ms per phase (a GPU phase whose device time
    is about its host time kept the device waiting for its host), or the CPU's ms; "" without step records. The
    ``step_span4`` and ``step_chunk4x`` stages' rows (another score span, longer scoring chunks) follow, labelled
    with what they changed."""
    stages = {"step": "", "step_span4": "", "step_chunk4x": " (4x scoring chunks)"}  # (span: from the records)
    recs = [{**r, "label": label} for stage, label in stages.items() for r in _load(out, stage) if r.get("split_ms")]
    if not recs:
        return ""
    phases = list(recs[0]["split_ms"])
    lines = [f"| step ({'device / host ms' if recs[0].get('split_host_ms') else 'ms'}) | " + " | ".join(phases) + " |",
             "| --- |" + " --- |" * len(phases)]
    for r in recs:
        host = r.get("split_host_ms") or {}
        cells = [f"{r['split_ms'][k]:.1f}" + (f" / {host[k]:.1f}" if k in host else "") for k in phases]
        span = f" (span {r['score_span']})" if r.get("score_span", 2) != 2 else ""
        lines.append(f"| {r['model']} {r['method']}{span}{r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| target | limit | measured | where | status |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        value = "—" if r["value"] is None else f"{r['value']:.3g}"
        lines.append(f"| {r['target']} | {r['limit']} | {value} | {r['where']} | {r['status']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "bench", "results", "gpu_check")
    print(table(evaluate(out)))
    print("\n" + phase_table(out))
