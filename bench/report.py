"""Render the committed step results (bench/results/step_*.json) into README.md between the
``<!-- bench:step -->`` markers: ``python bench/report.py`` (tests check the README matches)."""

import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- bench:step -->", "<!-- /bench:step -->"


def rendered() -> str:
    from ct_fast.app.step_bench import table

    parts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "step_*.json"))):
        with open(path) as f:
            data = json.load(f)
        env = data["env"]
        where = env.get("gpu") or f"CPU ({env.get('threads')} threads)"
        parts.append(f"`{os.path.relpath(path, ROOT)}` — {where}, torch {env.get('torch')}, commit "
                     f"{env.get('commit')}:\n\n{table(data['results'])}")
    return "\n\n".join(parts) if parts else "(no results yet: run `ct-fast bench`)"


def update(text: str) -> str:
    block = f"{BEGIN}\n{rendered()}\n{END}"
    if BEGIN not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)


if __name__ == "__main__":
    with open(README) as f:
        text = f.read()
    with open(README, "w") as f:
        f.write(update(text))
    print("README.md updated")
