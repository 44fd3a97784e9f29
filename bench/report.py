"""Render committed results into README.md between markers: the step results (bench/results/step_*.json)
between ``<!-- bench:step -->`` markers and the scale results (bench/results/cpu_scale.json) between
``<!-- bench:scale -->`` markers: ``python bench/report.py`` (tests check the README matches)."""

import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _header(path: str, env: dict) -> str:
    where = env.get("gpu") or f"CPU ({env.get('threads')} threads)"
    return f"`{os.path.relpath(path, ROOT)}` — {where}, torch {env.get('torch')}, commit {env.get('commit')}"


def _render(pattern: str, table, empty: str) -> str:
    """Every committed results file matching ``pattern``, headed by its machine and commit, as ``table(data)``."""
    parts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "results", pattern))):
        with open(path) as f:
            data = json.load(f)
        parts.append(f"{_header(path, data['env'])}:\n\n{table(data)}")
    return "\n\n".join(parts) if parts else empty


def rendered_step() -> str:
    from ct_fast.app.step_bench import table

    return _render("step_*.json", lambda data: table(data["results"]), "(no results yet: run `ct-fast bench`)")


def rendered_scale() -> str:
    from bench_scale import table

    return _render("*_scale.json", table, "(no results yet: run `python bench/bench_scale.py`)")


BLOCKS = {"step": rendered_step, "scale": rendered_scale}


def update(text: str) -> str:
    for name, render in BLOCKS.items():
        begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if begin not in text:
            raise SystemExit(f"README.md has no {begin} ... {end} block")
        block = f"{begin}\n{render()}\n{end}"
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text


if __name__ == "__main__":
    with open(README) as f:
        text = f.read()
    with open(README, "w") as f:
        f.write(update(text))
    print("README.md updated")
