"""Render committed results: into README.md between markers, the step results (bench/results/step_*.json and
gpu_step.json) between ``<!-- bench:step -->`` markers and the scale results (bench/results/*_scale.json) between
``<!-- bench:scale -->`` markers; and ``auto``'s kernel choices on a GPU (ct_fast/ops/gpu_choices.json) from the
GPU op benchmarks (bench/results/gpu_op_*.json). ``python bench/report.py`` (tests check both match);
``python bench/report.py --import gpu_check.tar.gz`` first files a GPU check's results (see bench/gpu_check.py)."""

import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, ROOT)  # the tables' renderers live in ct_fast: importable from a checkout without an install
README = os.path.join(ROOT, "README.md")


def _header(path: str, env: dict) -> str:
    where = env.get("gpu") or f"CPU ({env.get('threads')} threads)"
    return f"`{os.path.relpath(path, ROOT)}` — {where}, torch {env.get('torch')}, commit {env.get('commit')}"


def _results(*patterns: str) -> list[str]:
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(ROOT, "bench", "results", pattern)))


def _render(patterns, table, empty: str) -> str:
    """Every committed results file matching ``patterns``, headed by its machine and commit, as ``table(data)``."""
    parts = []
    for path in _results(*patterns):
        with open(path) as f:
            data = json.load(f)
        parts.append(f"{_header(path, data['env'])}:\n\n{table(data)}")
    return "\n\n".join(parts) if parts else empty


def rendered_step() -> str:
    from ct_fast.app.step_bench import table

    return _render(("step_*.json", "gpu_step.json"), lambda data: table(data["results"]), "(no results yet: run `ct-fast bench`)")


def rendered_scale() -> str:
    from bench_scale import table

    return _render(("*_scale.json",), table, "(no results yet: run `python bench/bench_scale.py`)")


BLOCKS = {"step": rendered_step, "scale": rendered_scale}


def update(text: str) -> str:
    for name, render in BLOCKS.items():
        begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if begin not in text:
            raise SystemExit(f"README.md has no {begin} ... {end} block")
        block = f"{begin}\n{render()}\n{end}"
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text


def gpu_choices() -> dict:
    """The content of ct_fast/ops/gpu_choices.json: ``measured.derive`` over the committed GPU op results."""
    from ct_fast.ops import measured

    paths, tile_paths = _results("gpu_op_*.json"), _results("gpu_tiles.json")
    archs = {}
    for path in paths + tile_paths:
        with open(path) as f:
            archs[os.path.basename(path)] = measured.architecture_of(json.load(f).get("env") or {})
    if None in archs.values() or len(set(archs.values())) > 1:  # one table, for the GPUs it was measured on
        raise SystemExit(f"bench/results: the GPU op results must come from one known GPU architecture, got {archs}; "
                         "keep one architecture's gpu_op_*.json / gpu_tiles.json (or add the GPU to "
                         "ct_fast.ops.measured.KNOWN_ARCHITECTURES)")
    records = _records(paths)
    return {"about": "auto's kernel choices and Triton tiles on a GPU, derived from bench/results/gpu_op_*.json and "
                     "gpu_tiles.json by ct_fast/ops/measured.py (python bench/report.py regenerates this file); "
                     "they apply on GPUs of the architectures they were measured on",
            "sources": [os.path.basename(p) for p in paths + tile_paths],
            "architectures": sorted(set(archs.values())), "choices": measured.derive(records),
            "tiles": measured.derive_tiles(_records(tile_paths), measured.tile_versions()),
            "products": measured.derive_products(records)}


def _records(paths) -> list[dict]:
    out = []
    for path in paths:
        with open(path) as f:
            out += json.load(f).get("results", [])
    return out



def import_run(archive: str) -> list[str]:
    """File a GPU check's ``gpu_check.tar.gz`` (what the device returns) as ``bench/results/gpu_<stage>.json``."""
    import tarfile

    with tarfile.open(archive) as tar:
        found = {os.path.basename(m.name): json.load(tar.extractfile(m)) for m in tar.getmembers()
                 if m.isfile() and m.name.endswith(".json")}
    for name, data in found.items():  # all checked before any is written
        if not (data.get("env") or {}).get("gpu"):
            raise SystemExit(f"{archive}: {name} was not measured on a GPU (a rehearsal?): nothing filed")
    written = []
    for name, data in found.items():
        path = os.path.join(ROOT, "bench", "results", f"gpu_{name}")
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        written.append(os.path.relpath(path, ROOT))
    return written


if __name__ == "__main__":
    if "--import" in sys.argv:  # python bench/report.py --import gpu_check.tar.gz
        for path in import_run(sys.argv[sys.argv.index("--import") + 1]):
            print(f"filed {path}")
    with open(README) as f:
        text = update(f.read())  # rendered in full before the file is opened for writing: a failure leaves it as is
    from ct_fast.ops import measured

    choices = json.dumps(gpu_choices(), indent=4) + "\n"
    with open(README, "w") as f:
        f.write(text)
    with open(measured.PATH, "w") as f:
        f.write(choices)
    print(f"README.md and {os.path.relpath(measured.PATH, ROOT)} updated")
