"""Every op against its pure-torch reference on fresh random inputs at awkward shapes, for every backend
available here (torch always; cpp when ct_fast._C is built; triton under TRITON_INTERPRET=1), plus
torch.library.opcheck and the backend-selection rules."""

import os

import pytest
import torch

from ct_fast import CTFastError, ops
from ct_fast.ops import library
from ct_fast.testing import assert_close, devices


def _cases(op):
    """(device, backend) pairs that can run ``op`` here: every device of ``devices()``, every backend built."""
    out = []
    for device in devices():
        dev = torch.device(device)
        names = ["torch"]
        if op in ops.NATIVE_OPS and ops.native() is not None:
            names.append("cpp" if device == "cpu" else "cuda")
        if op in ops.TRITON_OPS and ops.triton_available(dev) is None:
            names.append("triton")
        for b in names:
            if b == "cuda" and not getattr(ops.native(), "WITH_CUDA", False):
                continue
            marks = [pytest.mark.triton] if b == "triton" else []
            out.append(pytest.param(device, b, marks=marks, id=f"{device}-{b}"))
    return out


@pytest.fixture(autouse=True)
def _backend_env(request, monkeypatch):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend:
        monkeypatch.setenv("CT_FAST_BACKEND", backend)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


SCORE_SHAPES = [(1, 1, 1, 1, 1), (3, 5, 7, 13, 11), (4, 16, 9, 33, 24), (1, None, 6, 17, 10), (2, 8, 1, 2, 64)]


@pytest.mark.parametrize("device,backend", _cases("score_edges"))
@pytest.mark.parametrize("n_u,w,n_d,c,d", SCORE_SHAPES, ids=lambda s: str(s))
def test_score_edges(device, backend, n_u, w, n_d, c, d):
    g = _gen(n_u * 100 + n_d)
    W = None if w is None else torch.randn(n_u, w, d, generator=g)
    delta = torch.randn(c, d if w is None else n_u * w, generator=g)
    G = torch.randn(n_d, c, d, generator=g)
    want = ops.reference.score_edges(delta.double(), None if W is None else W.double(), G.double())
    got = ops.score_edges(delta.to(device), None if W is None else W.to(device), G.to(device)).cpu()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # error policy for reductions: at most 2x a same-dtype torch computation (both against fp64), plus a few
    # fp32 ulps of the absolute sum the reduction runs over (summation order differs between backends)
    ref32 = ops.reference.score_edges(delta, W, G)
    magnitude = ops.reference.score_edges(delta.abs().double(), None if W is None else W.abs().double(), G.abs().double())
    tol = 2 * (ref32.double() - want).abs() + 1e-6 * magnitude
    assert ((got.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("device,backend", _cases("masked_weight_grad"))
@pytest.mark.parametrize("out_features", [True, False])
def test_masked_weight_grad_backends(device, backend, out_features):
    g = _gen(3)
    x, go = torch.randn(19, 7, generator=g), torch.randn(19, 5, generator=g)
    index = torch.tensor([4, 0, 2]) if out_features else torch.tensor([6, 1])
    assert_close(ops.masked_weight_grad(x.to(device), go.to(device), index.to(device), out_features),
                 ops.reference.masked_weight_grad(x, go, index, out_features))


def _optimizer_case(seed, dtype, shapes=((7, 5), (5, 1), (3, 33), (1, 1), (9, 4)), col=(False, False, True, False, True),
                    device="cpu"):
    """Params as row views (some are column views of a [M, R] tensor), selections incl. empty and full."""
    g = _gen(seed)
    full, views, grads, rows, slots, m, v, steps = [], [], [], [], [], [], [], []
    for i, ((R, M), is_col) in enumerate(zip(shapes, col)):
        base = torch.randn((M, R) if is_col else (R, M), generator=g).to(dtype)
        view = base.t() if is_col else base
        pick = [torch.arange(R), torch.tensor([R - 1]), torch.arange(0, R, 2), torch.zeros(0, dtype=torch.long),
                torch.tensor([2, 0])][i % 5]
        cap = R + 2
        slot = torch.randperm(cap, generator=g)[:pick.numel()]
        full.append(base)
        views.append(view)
        rows.append(pick)
        slots.append(slot)
        grads.append(torch.randn(pick.numel(), M, generator=g))
        m.append(torch.randn(cap, M, generator=g))
        v.append(torch.rand(cap, M, generator=g))
        steps.append(torch.randint(0, 4, (cap,), generator=g).float())
    if device != "cpu":
        full = [t.to(device) for t in full]
        views = [t.t() if c else t for t, c in zip(full, col)]
        grads, rows, slots, m, v, steps = ([t.to(device) for t in ts] for ts in (grads, rows, slots, m, v, steps))
    return full, views, grads, rows, slots, m, v, steps


def _clone(xs):
    return [x.clone() for x in xs]


def _views_like(tensors, views):
    """Row views of ``tensors`` shaped like ``views`` (a transposed view where the original was one)."""
    return [t if v.stride() == t.stride() and v.shape == t.shape else t.t() for t, v in zip(tensors, views)]


@pytest.mark.parametrize("device,backend", _cases("masked_adamw_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("maximize,wd", [(False, 0.0), (True, 0.1)])
def test_masked_adamw(device, backend, dtype, maximize, wd):
    full, views, grads, rows, slots, m, v, steps = _optimizer_case(5, dtype, device=device)
    ref_full = _clone(full)
    ref_views = _views_like(ref_full, views)
    ref_m, ref_v, ref_steps = _clone(m), _clone(v), _clone(steps)
    args = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, maximize=maximize)
    library.masked_adamw_default(ref_views, grads, ref_m, ref_v, [], ref_steps, rows, slots, *args.values())
    ops.masked_adamw_(views, grads, m, v, [], steps, rows, slots, *args.values())
    for i in range(len(full)):
        assert_close(full[i].float(), ref_full[i].float(), dtype=dtype, name=f"param {i}")
        assert_close(m[i], ref_m[i], name=f"exp_avg {i}")
        assert_close(v[i], ref_v[i], name=f"exp_avg_sq {i}")
        assert torch.equal(steps[i], ref_steps[i])
        untouched = torch.ones(views[i].shape[0], dtype=torch.bool, device=views[i].device)
        untouched[rows[i]] = False
        start = _optimizer_case(5, dtype, device=device)[1][i]
        assert torch.equal(views[i][untouched], start[untouched]), "rows outside the selection changed"


@pytest.mark.parametrize("device,backend", _cases("masked_sgd_"))
@pytest.mark.parametrize("momentum,nesterov,dampening", [(0.0, False, 0.0), (0.9, False, 0.1), (0.9, True, 0.0)])
def test_masked_sgd(device, backend, momentum, nesterov, dampening):
    full, views, grads, rows, slots, m, _, steps = _optimizer_case(7, torch.float32, device=device)
    ref_full, ref_m, ref_steps = _clone(full), _clone(m), _clone(steps)
    ref_views = _views_like(ref_full, views)
    bufs, ref_bufs = (m, ref_m) if momentum else ([], [])
    args = (0.1, momentum, dampening, 0.01, nesterov, False)
    library.masked_sgd_default(ref_views, grads, ref_bufs, ref_steps, rows, slots, *args)
    ops.masked_sgd_(views, grads, bufs, steps, rows, slots, *args)
    for i in range(len(full)):
        assert_close(full[i], ref_full[i], name=f"param {i}")
        if momentum:
            assert_close(m[i], ref_m[i], name=f"buffer {i}")
        untouched = torch.ones(views[i].shape[0], dtype=torch.bool, device=views[i].device)
        untouched[rows[i]] = False
        assert torch.equal(views[i][untouched], _optimizer_case(7, torch.float32, device=device)[1][i][untouched])


def test_opcheck_every_op():
    g = _gen(0)
    full, views, grads, rows, slots, m, v, steps = _optimizer_case(9, torch.float32)
    keep = [0, 2, 4]
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    cases = {
        "score_edges": (torch.randn(6, 12, generator=g), torch.randn(3, 4, 5, generator=g), torch.randn(2, 6, 5, generator=g)),
        "masked_weight_grad": (torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g), torch.tensor([2, 0]), True),
        "masked_bias_grad": (torch.randn(6, 3, generator=g), None),
        "masked_adamw_": (pick(views), pick(grads), pick(m), pick(v), [], pick(steps), pick(rows), pick(slots),
                          1e-2, 0.9, 0.99, 1e-8, 0.0, False),
        "masked_sgd_": (pick(views), pick(grads), pick(m), pick(steps), pick(rows), pick(slots), 0.1, 0.9, 0.0, 0.0,
                        False, False),
    }
    assert set(cases) == set(library.OPS)
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.ct_fast, name).default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_explicit_backend_errors(monkeypatch):
    monkeypatch.setenv("CT_FAST_BACKEND", "cuda")
    with pytest.raises(CTFastError, match="cuda cannot run score_edges"):
        ops.score_edges(torch.randn(2, 3), None, torch.randn(1, 2, 3))
    monkeypatch.setenv("CT_FAST_BACKEND", "bogus")
    with pytest.raises(CTFastError, match="not one of"):
        ops.requested_backend()
    monkeypatch.setenv("CT_FAST_BACKEND", "cpp")
    assert ops.choose_backend("masked_weight_grad", torch.device("cpu")) == "torch"  # no kernel by design
    if ops.native() is not None:
        with pytest.raises(CTFastError, match="dtype torch.int64"):
            ops.choose_backend("masked_adamw_", torch.device("cpu"), (torch.int64,))


def test_auto_prefers_native_on_cpu(monkeypatch):
    monkeypatch.delenv("CT_FAST_BACKEND", raising=False)
    expected = "cpp" if ops.native() is not None else "torch"
    assert ops.choose_backend("masked_adamw_", torch.device("cpu"), (torch.float32,)) == expected
    assert ops.choose_backend("masked_weight_grad", torch.device("cpu"), (torch.float32,)) == "torch"
    assert ops.choose_backend("masked_adamw_", torch.device("cpu"), (torch.int64,)) == "torch"


def test_native_build_is_present_in_ci():
    """CI builds ct_fast._C (CppExtension): a missing build must fail loudly, not silently run Python."""
    if os.environ.get("CI") != "true" or os.environ.get("CT_FAST_SKIP_NATIVE") == "1":
        pytest.skip("only enforced in CI")
    assert ops.native() is not None, ops.native_error()


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_tuner_step_same_with_every_backend(backend, monkeypatch):
    """A tuner step with each backend: the same circuit and the same parameters as the torch reference."""
    from ct_fast import CircuitAdamW, CircuitTuner
    from ct_fast.testing import random_batch, tiny_model

    if backend == "cpp" and ops.native() is None:
        pytest.skip(ops.native_error())
    if backend == "triton" and ops.triton_available(torch.device("cpu")):
        pytest.skip(ops.triton_available(torch.device("cpu")))
    results = {}
    for b in ("torch", backend):
        monkeypatch.setenv("CT_FAST_BACKEND", b)
        model = tiny_model("llama")
        tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=20)
        r = [tuner.step(random_batch(37, seed=s)) for s in range(2)]
        results[b] = (model, r)
    (m0, r0), (m1, r1) = results["torch"], results[backend]
    for a, b in zip(r0, r1):
        assert [e[:2] for e in a.circuit.edges] == [e[:2] for e in b.circuit.edges]
    for (n, p), q in zip(m0.named_parameters(), m1.parameters()):
        assert_close(q, p, name=n)


@pytest.mark.parametrize("op", ["masked_adamw_", "masked_sgd_"])
@pytest.mark.parametrize("device,backend", _cases("masked_adamw_"))
def test_masked_updates_never_touch_unselected_lanes(op, device, backend, monkeypatch):
    """NaN-poison every unselected parameter row and state slot: after the op they are still NaN, bit for bit,
    and no NaN leaked into the selected rows."""
    if op == "masked_sgd_" and backend == "triton":
        monkeypatch.setenv("CT_FAST_BACKEND", "torch")  # no Triton SGD kernel
    full, views, grads, rows, slots, m, v, steps = _optimizer_case(11, torch.float32, device=device)
    for p, r, s, mm, vv in zip(views, rows, slots, m, v):
        keep_r = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
        keep_r[r] = True
        p[~keep_r] = float("nan")
        keep_s = torch.zeros(mm.shape[0], dtype=torch.bool, device=p.device)
        keep_s[s] = True
        mm[~keep_s] = float("nan")
        vv[~keep_s] = float("nan")
    before = [t.clone() for t in views + m + v]
    if op == "masked_adamw_":
        ops.masked_adamw_(views, grads, m, v, [], steps, rows, slots, 1e-2, 0.9, 0.99, 1e-8, 0.1, False)
    else:
        ops.masked_sgd_(views, grads, m, steps, rows, slots, 0.1, 0.9, 0.0, 0.01, False, False)
    after = views + m + v
    for b, a in zip(before, after):
        poisoned = torch.isnan(b)
        assert torch.isnan(a[poisoned]).all(), "an unselected lane was written"
        assert torch.isfinite(a[~poisoned]).all(), "NaN leaked into a selected lane"
