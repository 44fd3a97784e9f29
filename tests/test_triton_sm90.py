"""Every Triton kernel compiles for Hopper (sm_90) here, without a GPU (``bench/triton_sm90.py``: Triton's compiler
and the ptxas it ships build each cubin with the configurations the launchers pass on a GPU). The interpreter
tests run the kernels' Python; this catches what only the real compiler sees — a global that is not a constexpr,
dot shapes and operand types, shared memory over an H100's 227 KiB — before a GPU session does."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("CT_FAST_SKIP_SM90") == "1", reason="CT_FAST_SKIP_SM90=1")
def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "triton_sm90.py"), "--out",
                           str(tmp_path / "sm90.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not (tmp_path / "sm90.json").exists():
        pytest.fail(f"bench/triton_sm90.py wrote no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((tmp_path / "sm90.json").read_text())
    bad = {k["name"]: k.get("error", "") for k in report["kernels"] if not k["ok"]}
    assert not bad and proc.returncode == 0, f"kernels that do not compile for sm_90: {bad}\n{proc.stdout[-3000:]}"
    names = {k["name"].split()[0] for k in report["kernels"]}
    assert names >= {"score_edges", "residual_grads", "masked_weight_grad", "masked_adamw_", "masked_sgd_",
                     "nonfinite_flag_"}
    assert all(k["local"] == 0 for k in report["kernels"] if "local" in k), "a kernel spills to local memory"
    big = {k["name"]: k["stack"] for k in report["kernels"] if k.get("stack", 0) > 256}
    assert not big, f"stack frames over 256 bytes (registers spilled to local memory): {big}"
    scalar = [k["name"] for k in report["kernels"] if k["name"].split()[0] in ("masked_adamw_", "masked_sgd_")
              and k["vector_loads"] == 0]
    assert not scalar, f"bandwidth-bound optimizer kernels without 128-bit loads: {scalar}"
