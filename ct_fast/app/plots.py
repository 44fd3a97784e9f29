"""Pictures (PNG, matplotlib): circuits as layered graphs, training dynamics, the demo's comparison.

``plot_run_dir(RUN_DIR)`` (what ``ct-fast plot`` runs) regenerates every picture of a run directory.
"""

from __future__ import annotations

import json
import os

KIND_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "mlp": "#ff7f0e", "logits": "#d62728"}
METHOD_COLORS = {"circuit": "#1f77b4", "full": "#d62728", "lora": "#2ca02c"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layout(g: dict):
    """Display positions ``name -> (x, y)``: columns in residual order, heads stacked in each column."""
    L, H = g["n_layers"], g["n_heads"]
    n_mlp = 1 if not g.get("mlp_head_dim") else g["d_mlp"] // g["mlp_head_dim"]
    span = max(H, n_mlp)

    def ys(n):
        return [(i - (n - 1) / 2) * span / max(n, 1) for i in range(n)]

    pos = {"embed": (0.0, 0.0), "logits": (2 * L + 1.0, 0.0)}
    for layer in range(L):
        for h, y in enumerate(ys(H)):
            pos[f"attn.{layer}.{h}"] = (2 * layer + 1.0, y)
        names = [f"mlp.{layer}"] if n_mlp == 1 else [f"mlp.{layer}.{j}" for j in range(n_mlp)]
        for name, y in zip(names, ys(n_mlp)):
            pos[name] = (2 * layer + 2.0, y)
    return pos


def _display_node(name: str, g: dict) -> tuple[str, str]:
    """Where a downstream node is drawn and its kind: q/k/v heads at their (query-group) head."""
    parts = name.split(".")
    if parts[0] == "attn" and len(parts) == 4:
        layer, h, kind = int(parts[1]), int(parts[2]), parts[3]
        if kind in ("k", "v"):
            group = g["n_heads"] // g["n_kv_heads"]
            h = h * group + (group - 1) // 2
        return f"attn.{layer}.{h}", kind
    return name, "logits" if name == "logits" else "mlp"


def node_label(name: str) -> str:
    """Short display name: ``attn.12.3`` (a head's output) and ``attn.12.3.q`` (its query) -> ``12.3``
    (layer.head); ``attn.12.1.k`` -> ``12.kv1`` (key/value head 1 of layer 12); ``mlp.12`` -> ``MLP12``,
    ``mlp.12.3`` -> ``MLP12.3`` (MLP head); ``embed``, ``logits``."""
    parts = name.split(".")
    if parts[0] == "attn":
        if len(parts) == 4 and parts[3] in ("k", "v"):
            return f"{parts[1]}.kv{parts[2]}"
        return f"{parts[1]}.{parts[2]}"
    if parts[0] == "mlp":
        return "MLP" + ".".join(parts[1:])
    return name


def _edge_kind(d: str) -> str:
    parts = d.split(".")
    if parts[0] == "attn" and len(parts) == 4:
        return parts[3]
    return "logits" if d == "logits" else "mlp"


def edge_table(circuit: dict, limit: int | None = None) -> list[dict]:
    """The circuit's edges, strongest first: rank, source, target (names and L.h labels), the input the edge
    feeds (q, k, v, mlp, logits), score and share of the circuit's total score."""
    edges = sorted(circuit["edges"], key=lambda e: -abs(e[2]))
    total = sum(abs(e[2]) for e in edges) or 1.0
    rows = [{"rank": i + 1, "source": u, "target": d, "source_label": node_label(u), "target_label": node_label(d),
             "input": _edge_kind(d), "score": float(sc), "share": abs(sc) / total}
            for i, (u, d, sc) in enumerate(edges)]
    return rows[:limit] if limit else rows


def write_edge_table(circuit: dict, path_md: str, path_csv: str | None = None, title: str = "") -> list[str]:
    """The edge table as Markdown (and CSV)."""
    rows = edge_table(circuit)
    lines = [f"# {title}", ""] if title else []
    lines += ["| rank | from | to | into | score | share |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['rank']} | {r['source_label']} (`{r['source']}`) | {r['target_label']} (`{r['target']}`) | "
              f"{r['input']} | {r['score']:.4g} | {100 * r['share']:.1f}% |" for r in rows]
    with open(path_md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    out = [path_md]
    if path_csv:
        import csv

        with open(path_csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["rank"])
            w.writeheader()
            w.writerows(rows)
        out.append(path_csv)
    return out


def plot_circuit(circuit: dict, path: str, title: str = ""):
    """The circuit as a layered graph: embed, attention heads, MLPs, logits in residual-stream order; nodes
    of the circuit labelled (layer.head for heads, MLPL for MLPs); edge colour = the input it feeds, width =
    score (scale in the legend)."""
    plt = _plt()
    from matplotlib.lines import Line2D

    g = circuit["graph"]
    pos = _layout(g)
    L = g["n_layers"]
    n_cols = 2 * L + 2
    span = max(abs(y) for _, y in pos.values()) or 1.0
    fig, ax = plt.subplots(figsize=(min(40.0, max(8.0, 0.5 * n_cols + 4.0)), max(4.8, 0.7 * (2 * span + 2) + 2.5)))
    edges = circuit["edges"]
    top = max((abs(s) for *_, s in edges), default=1.0) or 1.0

    def width(score):
        return 0.4 + 3.6 * abs(score) / top

    used = set()
    for u, d, s in sorted(edges, key=lambda e: abs(e[2])):
        dn, kind = _display_node(d, g)
        (x0, y0), (x1, y1) = pos[u], pos[dn]
        used.update([u, dn])
        # a quadratic Bezier arc that rises with the distance it covers, so long edges clear the columns
        # they pass; q/k/v arcs to the same head are offset so they stay distinguishable
        lift = 0.18 * span * (x1 - x0 - 1) / max(1.0, L / 6) + {"q": 0.0, "k": 0.25, "v": -0.25}.get(kind, 0.0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + lift
        t = [i / 24 for i in range(25)]
        xs = [(1 - a) ** 2 * x0 + 2 * (1 - a) * a * cx + a * a * x1 for a in t]
        ys = [(1 - a) ** 2 * y0 + 2 * (1 - a) * a * cy + a * a * y1 for a in t]
        ax.plot(xs, ys, color=KIND_COLORS[kind], lw=width(s), alpha=0.35 + 0.6 * abs(s) / top,
                solid_capstyle="round", zorder=1)
    for name, (x, y) in pos.items():
        on = name in used
        marker = "s" if name.startswith("mlp") else ("D" if name in ("embed", "logits") else "o")
        ax.scatter([x], [y], s=90 if on else 22, marker=marker, zorder=2, color="#333333" if on else "#d8d8d8",
                   edgecolors="white", linewidths=0.8)
        if on:
            ax.annotate(node_label(name), (x, y), xytext=(0, 6), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, zorder=3,
                        bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.75))
    ticks = [0] + [v for layer in range(L) for v in (2 * layer + 1, 2 * layer + 2)] + [2 * L + 1]
    labels = ["embed"] + [t for layer in range(L) for t in (f"attn {layer}", f"MLP {layer}")] + ["logits"]
    ax.set_xticks(ticks, labels, rotation=60 if L > 8 else 45, ha="right", fontsize=7 if L > 8 else 8)
    ax.set_xlim(-0.8, 2 * L + 1.8)
    ax.set_yticks([])
    ax.set_ylabel("heads of a layer (stacked)", fontsize=8)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    gqa = g["n_kv_heads"] < g["n_heads"]
    into = {"q": "query", "k": "key", "v": "value", "mlp": "MLP input", "logits": "logits (unembedding)"}
    handles = [Line2D([], [], color="none", label="edge colour: the input it feeds")]
    handles += [Line2D([], [], color=c, lw=2.5, label=f"→ {into[k]}" + (
        " (drawn to the KV group's middle head)" if gqa and k in ("k", "v") else "")) for k, c in KIND_COLORS.items()]
    handles += [Line2D([], [], color="none", label=""), Line2D([], [], color="none", label="edge width: |score|")]
    handles += [Line2D([], [], color="#555555", lw=width(f * top), label=f"{f * top:.3g}" + (" (largest)" if f == 1 else ""))
                for f in (1.0, 0.5, 0.1)]
    handles += [Line2D([], [], color="none", label=""), Line2D([], [], color="none", label="nodes")]
    handles += [Line2D([], [], marker="o", color="#333333", ls="none", label="attention head L.h"),
                Line2D([], [], marker="s", color="#333333", ls="none",
                       label="MLP L" + (" (MLP head L.j)" if g.get("mlp_head_dim") else "")),
                Line2D([], [], marker="D", color="#333333", ls="none", label="embeddings / logits"),
                Line2D([], [], marker="o", color="#d8d8d8", ls="none", label="not in the circuit")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7.5, frameon=False)
    frac = circuit.get("fraction")
    sub = f"{len(edges)} edges, {len(circuit.get('nodes', []))} nodes"
    if frac is not None:
        sub += f", {100 * frac:.2f}% of parameters"
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_dynamics(runs: dict[str, list[dict]], path: str, title: str = ""):
    """Training dynamics of one or more runs: loss, target metric, tuned-parameter fraction, circuit size."""
    plt = _plt()
    panels = [("loss", "training loss", False), ("target_accuracy", "target accuracy (held out)", False),
              ("general_loss", "general loss (held out)", False), ("tuned_fraction", "tuned parameters (%)", True),
              ("circuit_nodes", "circuit size", False)]
    if not any(r.get("target_accuracy") is not None for recs in runs.values() for r in recs):
        panels[1:3] = [("metric", "attribution metric", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4))
    for ax, (key, label, pct) in zip(axes, panels):
        for name, records in runs.items():
            x, y = _series(records, key)
            if not x:
                continue
            y = [100 * v for v in y] if pct else y
            ax.plot(x, y, label=name if key != "circuit_nodes" else f"{name}: nodes", color=METHOD_COLORS.get(name),
                    lw=1.6, marker="o" if len(x) < 15 else None, ms=3)
            if key == "circuit_nodes":
                ax.plot(*_series(records, "circuit_edges"), ls="--", color=METHOD_COLORS.get(name), lw=1.6,
                        label=f"{name}: edges")
                ax.legend(fontsize=8, frameon=False)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        if pct:
            ax.set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend for the figure, above the panels
        fig.legend(handles, labels, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.99))
    if title:
        fig.suptitle(title, fontsize=11, y=1.06)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_methods(summary: dict, path: str):
    """The demo's comparison: disagreement accuracy and general loss, before and after, per method; share of
    parameters tuned per step (linear scale)."""
    plt = _plt()
    from matplotlib.patches import Patch

    methods = list(summary["methods"])
    res = summary["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    x = range(len(methods))
    colors = [METHOD_COLORS.get(m, "#7f7f7f") for m in methods]
    general = "loss on held-out English prose ↓ (general)" if summary.get("world") == "smollm2" else \
        "loss on agreement-neutral text ↓ (general)"
    panels = [("target_accuracy", "held-out disagreement accuracy ↑ (target)"), ("general_loss", general)]
    for ax, (key, label) in zip(axes, panels):
        before = [res[m][f"{key}_before"] for m in methods]
        after = [res[m][f"{key}_after"] for m in methods]
        ax.bar([i - 0.2 for i in x], before, 0.4, color="#cccccc")
        ax.bar([i + 0.2 for i in x], after, 0.4, color=colors)
        for i, v in enumerate(after):
            ax.text(i + 0.2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), methods)
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.12)
    axes[0].set_ylim(0, 1.1)
    ax = axes[2]
    frac = [100 * res[m]["tuned_param_fraction"] for m in methods]
    ax.bar(list(x), frac, 0.5, color=colors)
    for i, v in enumerate(frac):
        ax.text(i, v, f"{v:.2f}%", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_xticks(list(x), methods)
    ax.set_title("parameters tuned per step (%)", fontsize=10)
    legend = [Patch(color="#cccccc", label="before tuning")] + [Patch(color=c, label=f"after: {m}")
                                                                for m, c in zip(methods, colors)]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    title = summary.get("model")
    if title:
        fig.suptitle(f"tuning {title} toward subject-verb disagreement", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_tradeoff(summary: dict, run_dir: str, path: str):
    """Held-out disagreement accuracy against general loss. Final results of each method (large markers, full
    evaluation sets); each method's path during tuning (small markers: the tracked subsets, every
    ``eval_every`` steps, from ``<method>/log.jsonl``); circuit-tuning at other top-N when the demo swept them
    (a curve labelled N and % of parameters)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    start = summary.get("before_tracked")
    for m in summary.get("methods", {}):
        recs = [r for r in _read_log(os.path.join(run_dir, m)) if r.get("target_accuracy") is not None]
        xs = ([start["general_loss"]] if start else []) + [r["general_loss"] for r in recs]
        ys = ([start["target_accuracy"]] if start else []) + [r["target_accuracy"] for r in recs]
        if xs:
            ax.plot(xs, ys, "--", marker=".", lw=1, ms=5, alpha=0.6, color=METHOD_COLORS.get(m, "#7f7f7f"),
                    label=f"{m}: during tuning (tracked subset)")
    points = summary.get("tradeoff", [])
    circ = sorted((p for p in points if p["method"] == "circuit" and p.get("top_n")), key=lambda p: p["top_n"])
    if len(circ) > 1:
        ax.plot([p["general_loss"] for p in circ], [p["target_accuracy"] for p in circ], "-", lw=1.5,
                color=METHOD_COLORS["circuit"], alpha=0.8, label="circuit: over top-N")
    for p in circ:
        ax.annotate(f"N={p['top_n']} ({100 * p['tuned_param_fraction']:.1f}%)", (p["general_loss"], p["target_accuracy"]),
                    xytext=(6, -3), textcoords="offset points", fontsize=7)
    seen = set()
    for p in points:
        m = p["method"]
        label = {"before": "before tuning"}.get(m, f"{m}: after tuning") if m not in seen else None
        seen.add(m)
        ax.scatter([p["general_loss"]], [p["target_accuracy"]], marker="x" if m == "before" else "o", s=60,
                   color=METHOD_COLORS.get(m, "#333333"), label=label, zorder=3)
    ax.set_xlabel("general loss on held-out prose (worse →)")
    ax.set_ylabel("held-out disagreement accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_title("target accuracy vs general capability", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _read_log(run_dir: str) -> list[dict]:
    """A run's ``log.jsonl`` records (``RunDir.read_log``: a torn last line dropped; none without a log)."""
    from .run import RunDir

    return RunDir(run_dir, create=False).read_log()


def _circuit_snapshots(run_dir: str, tag: str) -> list[str]:
    """Circuit pictures of the first, middle and last saved circuits of a run."""
    d = os.path.join(run_dir, "circuits")
    files = sorted(f for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []
    if not files:
        return []
    picks = sorted({0, len(files) // 2, len(files) - 1})
    labels = {1: ["end"], 2: ["start", "end"], 3: ["start", "middle", "end"]}[len(picks)]
    out = []
    for i, label in zip(picks, labels):
        with open(os.path.join(d, files[i])) as f:
            c = json.load(f)
        if "graph" not in c:
            continue
        name = os.path.join(run_dir, f"circuit_{label}.png")
        out.append(plot_circuit(c, name, f"{tag} circuit at step {c.get('step', '?')} ({label})"))
    return out


def plot_run_dir(run_dir: str) -> list[str]:
    """Regenerate every picture of a run directory (a tune/discover run, or the demo's root)."""
    if not os.path.isdir(run_dir):
        from ..errors import CTFastError
        raise CTFastError(f"run directory {run_dir!r} does not exist")
    out = []
    summary_path = os.path.join(run_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    if "methods" in summary:  # the demo: one sub-run per method
        runs = {m: _read_log(os.path.join(run_dir, m)) for m in summary["methods"]}
        out.append(plot_methods(summary, os.path.join(run_dir, "comparison.png")))
        out.append(plot_dynamics(runs, os.path.join(run_dir, "dynamics.png"), "tuning toward subject-verb disagreement"))
        if os.path.isdir(os.path.join(run_dir, "circuit")):
            out += _circuit_snapshots(os.path.join(run_dir, "circuit"), "circuit-tuning")
        if summary.get("tradeoff"):
            out.append(plot_tradeoff(summary, run_dir, os.path.join(run_dir, "tradeoff.png")))
        return out
    records = _read_log(run_dir)
    if records:
        config_path = os.path.join(run_dir, "config.json")
        method = json.load(open(config_path)).get("method", "circuit") if os.path.exists(config_path) else "circuit"
        out.append(plot_dynamics({method: records}, os.path.join(run_dir, "dynamics.png")))
    out += _circuit_snapshots(run_dir, os.path.basename(os.path.abspath(run_dir)))
    single = os.path.join(run_dir, "circuit.json")
    if os.path.exists(single):
        with open(single) as f:
            c = json.load(f)
        out.append(plot_circuit(c, os.path.join(run_dir, "circuit.png"), c.get("title", "discovered circuit")))
    return out


__all__ = ["edge_table", "node_label", "plot_circuit", "plot_dynamics", "plot_methods", "plot_run_dir", "plot_tradeoff",
           "write_edge_table"]
