"""A circuit-tuning step per backend on the device ``CT_FAST_TEST_DEVICE`` names (default ``cuda``: skipped
without a GPU; ``bench/gpu_check.sh`` runs this file on one, and its ``--rehearse`` on the CPU): the fp32
circuit equals the CPU torch circuit, parameters outside the circuit stay bit-identical, in fp32 and bf16."""

import os

import pytest
import torch

import ct_fast
from ct_fast import CircuitAdamW, CircuitTuner, CTFastError, ParamSelection
from ct_fast.testing import random_batch, tiny_model

DEVICE = os.environ.get("CT_FAST_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no GPU here: bench/gpu_check.sh runs these on one")
BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")


def _step(model, batch, mode="deferred"):
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=25, memory_mode=mode)
    return tuner.step(batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_circuit_step_per_backend(backend, dtype, monkeypatch):
    if backend == "cuda" and DEVICE != "cuda" or backend == "cpp" and DEVICE == "cuda":
        pytest.skip(f"the {backend} backend does not run on {DEVICE}")
    if backend == "triton" and DEVICE == "cpu" and (dtype != torch.float32 or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("Triton on the CPU: fp32 under TRITON_INTERPRET=1 only")
    batch = random_batch(37, seed=3)
    want = _step(tiny_model("llama"), batch).circuit  # the CPU fp32 torch reference
    monkeypatch.setenv("CT_FAST_BACKEND", backend)
    model = tiny_model("llama", dtype=dtype).to(DEVICE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        result = _step(model, {k: v.to(DEVICE) for k, v in batch.items()})
    except CTFastError as e:
        if str(e).startswith(f"CT_FAST_BACKEND={backend}"):
            pytest.skip(str(e))  # the backend refuses this call (not built, dtype): the dispatcher says why
        raise
    masks = result.circuit.param_masks(model)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), f"{n} changed outside the circuit"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    if dtype == torch.float32:
        assert [e[:2] for e in result.circuit.edges] == [e[:2] for e in want.edges]


def test_candidate_pruning_on_the_device():
    """Deferred steps with candidate pruning (its decisions read one span late, through pinned memory on a GPU)
    select and update as the unpruned steps do."""
    from ct_fast import pruning

    results = []
    for prune in (True, False):
        model = tiny_model("llama").to(DEVICE)
        tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=25, memory_mode="deferred")
        tuner.session.prune = prune
        steps = [tuner.step({k: v.to(DEVICE) for k, v in random_batch(37, seed=s).items()}) for s in range(2)]
        results.append(([[e[:2] for e in r.circuit.edges] for r in steps], [p.detach() for p in model.parameters()]))
    (edges, params), (want_edges, want_params) = results
    assert edges == want_edges
    for p, q in zip(params, want_params):
        torch.testing.assert_close(p, q)
    flags = torch.tensor([True, False, True], device=DEVICE)
    host, copied = pruning._to_host(flags)
    assert host.device.type == "cpu" and (copied is None) == (DEVICE != "cuda")
    if copied is not None:
        assert host.is_pinned()
        copied.synchronize()
    assert host.tolist() == [True, False, True]


def test_phase_timings_on_the_device():
    """``profile=True``: every phase timed on the device (CUDA events) and on the host, from the same spans."""
    model = tiny_model("llama").to(DEVICE)
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=25, profile=True)
    r = tuner.step({k: v.to(DEVICE) for k, v in random_batch(37).items()})
    phases = {"forward", "attribution", "selection", "backward", "optimizer", "total"}
    assert set(r.timings) == set(r.host_timings) == phases
    assert all(v >= 0 for v in (*r.timings.values(), *r.host_timings.values()))
    assert r.timings["forward"] > 0 and r.host_timings["forward"] > 0 and r.timings["attribution"] > 0


def test_dropin_and_memory_modes_on_the_device():
    model = tiny_model("qwen2").to(DEVICE)
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25)
    for s in range(2):
        model(**{k: v.to(DEVICE) for k, v in random_batch(37, seed=s).items()}).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.last_step.circuit is not None and all(p.grad is None for p in model.parameters())
    opt.detach()
    for mode in ("two_pass", "lagged"):
        r = _step(tiny_model("llama").to(DEVICE), {k: v.to(DEVICE) for k, v in random_batch(37).items()}, mode)
        assert r.memory_mode in (mode, "two_pass")
    assert ct_fast.ops.requested_backend() in ("auto",) + BACKENDS


def test_fixed_circuit_step_captured_in_a_cuda_graph():
    """A fixed circuit's optimizer step — bounded shared pool, lr as a device tensor, the skip flag on — captured
    in a CUDA graph and replayed equals the eager steps, a NaN step skipped on the device included (no host
    value decides anything: the step count, slots and evictions live on the device)."""
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=gen), torch.randn(32, 64, generator=gen)]
    grads = [[torch.randn(64, 32, generator=gen), torch.randn(32, 64, generator=gen)] for _ in range(5)]
    grads[3][0][5, 0] = float("nan")  # a selected row: that step writes nothing

    def make():
        params = [x.to(DEVICE).requires_grad_() for x in start]
        opt = CircuitAdamW(params, lr=torch.tensor(1e-2, device=DEVICE), state_capacity=0.25, skip_nonfinite=True)
        opt.set_circuit({params[0]: ParamSelection(0, 64, ((3, 11), (40, 46))),  # 30 rows of a shared pool of 32
                         params[1]: ParamSelection(1, 64, ((0, 16),))})
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, opt

    def load(params, g):
        for p, x in zip(params, g):
            p.grad.copy_(x)

    eager, e_opt = make()
    for g in grads:
        load(eager, g)
        e_opt.step()
    cap, c_opt = make()
    load(cap, grads[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up step allocates the pools and builds the indices
        c_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c_opt.step()
    skipped = []
    for g in grads[1:]:
        load(cap, g)
        graph.replay()
        skipped.append(float(c_opt.step_skipped))
    assert skipped == [0.0, 0.0, 1.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(cap, eager))
    assert c_opt.clock() == e_opt.clock() == 5 and c_opt.num_state_rows() == e_opt.num_state_rows()
