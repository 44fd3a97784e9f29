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


def plot_circuit(circuit: dict, path: str, title: str = ""):
    """The circuit as a layered graph: embed, attention heads, MLPs, logits; edge width by score."""
    plt = _plt()
    g = circuit["graph"]
    pos = _layout(g)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * (2 * g["n_layers"] + 2)), 4.8))
    edges = circuit["edges"]
    top = max((abs(s) for *_, s in edges), default=1.0) or 1.0
    used = set()
    span = max(abs(y) for _, y in pos.values()) or 1.0
    for u, d, s in sorted(edges, key=lambda e: e[2]):
        dn, kind = _display_node(d, g)
        (x0, y0), (x1, y1) = pos[u], pos[dn]
        used.update([u, dn])
        # a quadratic Bezier arc that rises with the distance it covers, so long edges clear the columns
        # they pass; q/k/v arcs to the same head are offset so they stay distinguishable
        lift = 0.18 * span * (x1 - x0 - 1) + {"q": 0.0, "k": 0.25, "v": -0.25}.get(kind, 0.0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + lift
        t = [i / 24 for i in range(25)]
        xs = [(1 - a) ** 2 * x0 + 2 * (1 - a) * a * cx + a * a * x1 for a in t]
        ys = [(1 - a) ** 2 * y0 + 2 * (1 - a) * a * cy + a * a * y1 for a in t]
        ax.plot(xs, ys, color=KIND_COLORS[kind], lw=0.4 + 3.6 * abs(s) / top, alpha=0.35 + 0.6 * abs(s) / top,
                solid_capstyle="round", zorder=1)
    for name, (x, y) in pos.items():
        on = name in used
        marker = "s" if name.startswith("mlp") else ("D" if name in ("embed", "logits") else "o")
        ax.scatter([x], [y], s=90 if on else 30, marker=marker, zorder=2, color="#333333" if on else "#d0d0d0",
                   edgecolors="white", linewidths=0.8)
    L = g["n_layers"]
    ticks = [0] + [v for layer in range(L) for v in (2 * layer + 1, 2 * layer + 2)] + [2 * L + 1]
    labels = ["embed"] + [t for layer in range(L) for t in (f"attn {layer}", f"MLP {layer}")] + ["logits"]
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    gqa = g["n_kv_heads"] < g["n_heads"]  # k/v edges end at the first query head of their KV group
    handles = [plt.Line2D([], [], color=c, lw=2.5, label=f"→ {k}" + (" (KV group)" if gqa and k in ("k", "v") else ""))
               for k, c in KIND_COLORS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    n_params = circuit.get("fraction")
    sub = f"{len(edges)} edges, {len(circuit.get('nodes', []))} nodes"
    if n_params is not None:
        sub += f", {100 * n_params:.2f}% of parameters"
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
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
        if pct and any(_series(r, key)[0] for r in runs.values()):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_methods(summary: dict, path: str):
    """The demo's comparison: disagreement accuracy and general loss, before and after, per method."""
    plt = _plt()
    methods = list(summary["methods"])
    res = summary["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = range(len(methods))
    colors = [METHOD_COLORS.get(m, "#7f7f7f") for m in methods]
    panels = [("target_accuracy", "disagreement accuracy ↑ (target task)"),
              ("general_loss", "loss on agreement-neutral text ↓ (general)")]
    for ax, (key, label) in zip(axes, panels):
        before = [res[m][f"{key}_before"] for m in methods]
        after = [res[m][f"{key}_after"] for m in methods]
        ax.bar([i - 0.2 for i in x], before, 0.4, color="#cccccc", label="before")
        ax.bar([i + 0.2 for i in x], after, 0.4, color=colors, label="after")
        for i, v in enumerate(after):
            ax.text(i + 0.2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), methods)
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8, frameon=False)
    ax = axes[2]
    frac = [100 * res[m]["tuned_param_fraction"] for m in methods]
    ax.bar(list(x), frac, 0.5, color=colors)
    for i, v in enumerate(frac):
        ax.text(i, v, f"{v:.2f}%", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(x), methods)
    ax.set_title("parameters tuned per step (%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
        runs = {m: _read_jsonl(os.path.join(run_dir, m, "log.jsonl")) for m in summary["methods"]}
        out.append(plot_methods(summary, os.path.join(run_dir, "comparison.png")))
        out.append(plot_dynamics(runs, os.path.join(run_dir, "dynamics.png"), "tuning toward subject-verb disagreement"))
        if os.path.isdir(os.path.join(run_dir, "circuit")):
            out += _circuit_snapshots(os.path.join(run_dir, "circuit"), "circuit-tuning")
        return out
    records = _read_jsonl(os.path.join(run_dir, "log.jsonl"))
    if records:
        out.append(plot_dynamics({"circuit": records}, os.path.join(run_dir, "dynamics.png")))
    out += _circuit_snapshots(run_dir, os.path.basename(os.path.abspath(run_dir)))
    single = os.path.join(run_dir, "circuit.json")
    if os.path.exists(single):
        with open(single) as f:
            out.append(plot_circuit(json.load(f), os.path.join(run_dir, "circuit.png"), "discovered circuit"))
    return out


__all__ = ["plot_circuit", "plot_dynamics", "plot_methods", "plot_run_dir"]
