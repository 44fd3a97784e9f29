"""State interchange with torch.optim: torch AdamW/SGD state_dicts load into the circuit optimizers and continue
torch's trajectory (dense and masked); a circuit state in a torch optimizer raises instead of being ignored;
circuit states whose rows all hold state convert back to torch's format."""

import copy
import io

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

from ct_fast import CircuitAdamW, CircuitSGD, CTFastError, ParamSelection
from ct_fast.state_interchange import install_torch_guard, to_torch_state
from ct_fast.testing import assert_close

ADAMW = [dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6),
         dict(lr=1e-2, amsgrad=True, weight_decay=0.05), dict(lr=1e-2, maximize=True, weight_decay=0.0)]
SGD = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
       dict(lr=0.05, momentum=0.5, dampening=0.3, maximize=True)]
SHAPES = [(7, 5), (5,), (3, 11), (1,), ()]


def _pairs():
    return ([(CircuitAdamW, torch.optim.AdamW, kw) for kw in ADAMW]
            + [(CircuitSGD, torch.optim.SGD, kw) for kw in SGD])


def _ids(x):
    return getattr(x, "__name__", None) or "-".join(f"{k}={v}" for k, v in x.items())


def _params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _set_grads(step, *param_lists):
    """The same random gradients (fresh per step) on each list of parameters; returns them."""
    gs = _grads(param_lists[0], step)
    for params in param_lists:
        for p, g in zip(params, gs):
            p.grad = g.clone()
    return gs


def _torch_run(theirs, kw, steps=3, shapes=SHAPES, groups=None):
    """A torch optimizer after ``steps`` dense steps on random parameters."""
    params = _params(shapes=shapes)
    arg = params if groups is None else [dict(params=[params[i] for i in idx], **extra) for idx, extra in groups]
    opt = theirs(arg, foreach=False, **kw)
    for step in range(steps):
        _set_grads(step, params)
        opt.step()
    return params, opt


def _transport(sd, how):
    if how == "deepcopy":
        return copy.deepcopy(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _opposite(ours, kw):
    """The constructor's amsgrad / momentum opposite to ``kw``'s."""
    if ours is CircuitAdamW:
        return dict(amsgrad=not kw.get("amsgrad", False))
    return dict(momentum=0.0 if kw.get("momentum") else 0.9)


def _structural(ours, kw):
    """Only the constructor arguments that fix a circuit optimizer's moment buffers: every other
    hyper-parameter comes from the loaded state_dict (as in torch)."""
    if ours is CircuitAdamW:
        return dict(amsgrad=kw.get("amsgrad", False))
    return dict(momentum=kw.get("momentum", 0.0))


def _take(t, dim, idx):
    return (t.reshape(1) if t.dim() == 0 else t).index_select(dim, idx)


# ---- torch -> circuit: dense continuation -------------------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("ours,theirs,kw", _pairs(), ids=_ids)
def test_torch_state_continues_its_trajectory(ours, theirs, kw, how):
    ref, ref_opt = _torch_run(theirs, kw)
    params = _clone(ref)
    # lr, like every hyper-parameter, comes from the state — amsgrad and momentum too (the moments follow them,
    # as torch's do): built with the opposite ones, the run still continues torch's
    opt = ours(params, lr=0.5, **_opposite(ours, kw))
    opt.load_state_dict(_transport(ref_opt.state_dict(), how))
    assert opt.param_groups[0]["lr"] == kw["lr"] and opt.param_groups[0]["state_capacity"] is None
    for p, q in zip(params, ref):  # the loaded state: every row along axis 0 holds a slot, fp32, on the device
        s, t = opt.param_state(p), ref_opt.state.get(q, {})
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            assert (k in s) == (k in t), k
            if k in s:
                n = p.shape[0] if p.dim() else 1
                assert s[k].dtype == torch.float32 and s[k].shape[1] == max(1, p.numel()) // n
                assert torch.equal(s[k].index_select(0, s["slot"]), t[k].reshape(n, -1))
        if s:
            assert s["dim"] == 0 and bool((s["slot"] >= 0).all())
            assert bool((s["step"][s["slot"]] == (3.0 if ours is CircuitAdamW else 1.0)).all())
    for step in range(3, 6):
        _set_grads(step, params, ref)
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        assert_close(p, q, name="param")
        if ours is CircuitAdamW:  # bias correction used steps 4, 5, 6
            s = opt.param_state(p)
            assert bool((s["step"][s["slot"]] == 6.0).all()) and float(ref_opt.state[q]["step"]) == 6.0


def test_sgd_state_without_momentum_buffer_starts_it():
    """Older torch saved ``momentum_buffer: None`` (no buffer yet): the next step starts the buffer."""
    kw = dict(lr=0.05, momentum=0.9)
    ref, ref_opt = _torch_run(torch.optim.SGD, kw)
    sd = copy.deepcopy(ref_opt.state_dict())
    sd["state"][2] = {"momentum_buffer": None}
    sd["state"][4] = {}  # an empty entry (reading torch's defaultdict state creates one): no state
    ref_opt.load_state_dict(sd)
    params = _clone(ref)
    opt = CircuitSGD(params, **kw)
    opt.load_state_dict(sd)
    assert params[2] not in opt.state or not opt.state[params[2]]
    for step in range(3, 5):
        _set_grads(step, params, ref)
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        assert_close(p, q, name="param")


def test_adam_without_weight_decay_loads():
    """torch.optim.Adam with weight_decay=0 is AdamW with weight_decay=0."""
    ref, ref_opt = _torch_run(torch.optim.Adam, dict(lr=1e-2))
    params = _clone(ref)
    opt = CircuitAdamW(params)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for step in range(3, 5):
        _set_grads(step, params, ref)
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        assert_close(p, q, name="param")


def test_bounded_pool_loads_full_1d_pools():
    """1-D parameters always get a full pool, so a bounded state_capacity loads their dense state."""
    kw = dict(lr=1e-2, weight_decay=0.1)
    ref, ref_opt = _torch_run(torch.optim.AdamW, kw, shapes=[(6,), ()])
    params = _clone(ref)
    opt = CircuitAdamW(params, state_capacity=1, **kw)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    for step in range(3, 5):
        _set_grads(step, params, ref)
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        assert_close(p, q, name="param")


# ---- torch -> circuit: masked steps after loading ------------------------------------------------------

MASKED = [(CircuitAdamW, torch.optim.AdamW, ADAMW[1]), (CircuitAdamW, torch.optim.AdamW, ADAMW[2]),
          (CircuitAdamW, torch.optim.AdamW, ADAMW[3]), (CircuitSGD, torch.optim.SGD, SGD[2]),
          (CircuitSGD, torch.optim.SGD, SGD[3])]


@pytest.mark.parametrize("ours,theirs,kw", MASKED, ids=_ids)
def test_masked_steps_after_loading_continue_torch_on_the_selection(ours, theirs, kw):
    ref, ref_opt = _torch_run(theirs, kw)
    params = _clone(ref)
    opt = ours(params, **kw)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    sel = {params[0]: ParamSelection(1, 5, ((1, 3), (4, 5))),  # columns: the dense state is re-laid out
           params[2]: ParamSelection(0, 3, ((0, 1), (2, 3))), params[4]: ParamSelection(0, 1, ((0, 1),))}
    opt.set_circuit(sel)  # params 1 and 3 frozen
    solo = {}  # torch continuing on the selected slice only, from the torch state of that slice
    for i, p in enumerate(params):
        if p in sel:
            s, idx = sel[p], sel[p].index()
            q = _take(ref[i].detach(), s.dim, idx).clone().requires_grad_()
            o = theirs([q], foreach=False, **kw)
            o.state[q] = {k: v.clone() if k == "step" else _take(v, s.dim, idx).clone()
                          for k, v in ref_opt.state[ref[i]].items()}
            solo[i] = (q, o)
    for step in range(3, 5):
        before = [p.detach().clone() for p in params]
        grads = _set_grads(step, params)
        opt.step()
        for i, p in enumerate(params):
            if i not in solo:
                assert torch.equal(p.detach(), before[i]), i
                continue
            s = sel[p]
            idx = s.index()
            rest = torch.tensor([r for r in range(s.size) if r not in set(idx.tolist())], dtype=torch.long)
            q, o = solo[i]
            q.grad = _take(grads[i], s.dim, idx).clone()
            o.step()
            assert_close(_take(p.detach(), s.dim, idx), q, name=f"param {i} step {step}")
            assert torch.equal(_take(p.detach(), s.dim, rest), _take(before[i], s.dim, rest)), i


# ---- circuit -> torch: a clear error, never a silent drop ---------------------------------------------

@pytest.mark.parametrize("ours,theirs,kw", [(CircuitAdamW, torch.optim.AdamW, dict(lr=1e-2)),
                                            (CircuitSGD, torch.optim.SGD, dict(lr=0.1)),
                                            (CircuitSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9))], ids=_ids)
def test_circuit_state_in_a_torch_optimizer_raises_at_step(ours, theirs, kw):
    assert install_torch_guard() is install_torch_guard()  # idempotent
    hooks = _global_optimizer_pre_hooks.values()
    assert sum(getattr(h, "__module__", "") == "ct_fast.state_interchange" for h in hooks) == 1
    params = _params()
    opt = ours(params, **kw)
    for step in range(2):  # one dense step, one masked (circuit optimizers pass the guard)
        opt.set_circuit(None if step == 0 else {params[0]: ParamSelection(0, 7, ((2, 4),))})
        _set_grads(step, params)
        opt.step()
    sd = opt.state_dict()
    torch_params = _clone(params)
    t = theirs(torch_params, **kw)
    _set_grads(0, torch_params)
    t.step()  # a clean state: scanned once, then cached
    t.step()
    for how in ("deepcopy", "torch.save"):
        t.load_state_dict(_transport(sd, how))
        _set_grads(5, torch_params)
        before = [p.detach().clone() for p in torch_params]
        with pytest.raises(CTFastError, match=rf"torch\.optim\.{theirs.__name__} holds a ct_fast circuit-optimizer "
                                              rf"state .*ct_fast\.{ours.__name__}"):
            t.step()
        for p, b in zip(torch_params, before):
            assert torch.equal(p.detach(), b)
    # a torch state again: steps run
    fresh = theirs(_clone(params), **kw)
    _set_grads(0, fresh.param_groups[0]["params"])
    fresh.step()
    t.load_state_dict(fresh.state_dict())
    t.step()


@pytest.mark.parametrize("ours,theirs,kw", [(CircuitAdamW, torch.optim.AdamW, ADAMW[2]),
                                            (CircuitSGD, torch.optim.SGD, SGD[2]),
                                            (CircuitSGD, torch.optim.SGD, SGD[0])], ids=_ids)
def test_to_torch_state_round_trip(ours, theirs, kw):
    """A state in which every row holds state at one step count (dense steps, then a whole-parameter column
    selection with its compact gradient, which re-lays one parameter out along axis 1) continues identically
    in torch."""
    params = _params()
    opt = ours(params, **kw)
    for step in range(3):
        opt.set_circuit({params[0]: ParamSelection(1, 5, ((0, 5),))} if step == 2 else None)
        _set_grads(step, params)
        if step == 2:  # columns in order, as the tuner hands them (a whole selection without one keeps its axis)
            opt.set_grad_rows({params[0]: params[0].grad.t().contiguous()})
        opt.step()
    if "momentum" in kw or ours is CircuitAdamW:
        assert opt.param_state(params[0])["dim"] == 1
    opt.set_circuit(None)
    torch_params = _clone(params)
    t = theirs(torch_params, foreach=False)
    t.load_state_dict(to_torch_state(_transport(opt.state_dict(), "torch.save"), params))
    assert t.param_groups[0]["lr"] == kw["lr"]
    for step in range(3, 6):
        _set_grads(step, params, torch_params)
        opt.step()
        t.step()
    for p, q in zip(params, torch_params):
        assert_close(p, q, name="param")
    # and back: the torch state loads into a circuit optimizer again
    back = _clone(torch_params)
    opt2 = ours(back, **_structural(ours, kw))
    opt2.load_state_dict(t.state_dict())
    _set_grads(6, back, torch_params)
    opt2.step()
    t.step()
    for p, q in zip(back, torch_params):
        assert_close(p, q, name="param")


def test_to_torch_state_refuses_a_partial_row_state():
    params = _params()
    opt = CircuitAdamW(params)
    opt.set_circuit({params[0]: ParamSelection(0, 7, ((1, 3),))})
    _set_grads(0, params)
    opt.step()
    with pytest.raises(CTFastError, match="2 of its 7 rows"):
        to_torch_state(opt.state_dict(), params)


# ---- mismatches: clear errors, nothing loaded ----------------------------------------------------------

def _load_fails(opt, sd, match):
    with pytest.raises(CTFastError, match=match):
        opt.load_state_dict(copy.deepcopy(sd))
    assert not any(opt.state.values())


def test_mismatch_errors():
    ref, adamw = _torch_run(torch.optim.AdamW, dict(lr=1e-2))
    _, ams = _torch_run(torch.optim.AdamW, dict(lr=1e-2, amsgrad=True))
    _, sgd = _torch_run(torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    _, adam_l2 = _torch_run(torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1))
    p = _clone(ref)
    _load_fails(CircuitSGD(p, momentum=0.9), adamw.state_dict(), r"torch\.optim\.Adam/AdamW.*CircuitAdamW")
    _load_fails(CircuitAdamW(p), sgd.state_dict(), r"torch\.optim\.SGD.*ct_fast\.CircuitSGD")
    _load_fails(CircuitAdamW(p), adam_l2.state_dict(), r"torch\.optim\.Adam with weight_decay=0\.1")
    for other in (torch.optim.RAdam, torch.optim.NAdam, torch.optim.Adamax):  # betas too, other updates
        _, state = _torch_run(other, dict(lr=1e-2))
        _load_fails(CircuitAdamW(p), state.state_dict(), "saved by another optimizer")
    inconsistent = copy.deepcopy(ams.state_dict())
    inconsistent["param_groups"][0]["amsgrad"] = False
    _load_fails(CircuitAdamW(p), inconsistent, r"max_exp_avg_sq.*saved param group has amsgrad=False.*inconsistent")
    # a bounded pool cannot hold a dense state (the 2-D parameters): raise state_capacity or start fresh
    _load_fails(CircuitAdamW(p, state_capacity=0.5), adamw.state_dict(),
                r"shape \(7, 5\).*state_capacity=0\.5.*pool of 4 rows.*state_capacity=None.*fresh run")
    # a per-group capacity of this run applies to torch's groups (which have none)
    groups = [([0, 1], {}), ([2, 3, 4], {})]
    _, grouped = _torch_run(torch.optim.AdamW, dict(lr=1e-2), groups=groups)
    _load_fails(CircuitAdamW([dict(params=p[:2]), dict(params=p[2:], state_capacity=2)]), grouped.state_dict(),
                r"shape \(3, 11\).*state_capacity=2")
    ok = CircuitAdamW([dict(params=p[:2], state_capacity=0.5), dict(params=p[2:])])
    with pytest.raises(CTFastError, match=r"shape \(7, 5\)"):
        ok.load_state_dict(grouped.state_dict())
    # other parameters: shapes, group sizes
    _load_fails(CircuitAdamW(_params(shapes=[(5, 7), (5,), (3, 11), (1,), ()])), adamw.state_dict(),
                r"exp_avg of parameter 0 has shape \(7, 5\), the parameter \(5, 7\)")
    _load_fails(CircuitAdamW(p[:4]), adamw.state_dict(), r"1 param group\(s\) of \[5\] parameters.*\[4\]")
    _load_fails(CircuitAdamW([dict(params=p[:2]), dict(params=p[2:])]), adamw.state_dict(), "same groups")


def test_circuit_state_of_the_other_kind_raises():
    params = _params()
    opt = CircuitSGD(params, lr=0.1, momentum=0.9)
    _set_grads(0, params)
    opt.step()
    _load_fails(CircuitAdamW(_clone(params)), opt.state_dict(), r"CircuitSGD")
    # built without momentum, it takes the saved group's (and its buffers), as torch.optim.SGD does
    other = _clone(params)
    same = CircuitSGD(other, lr=0.5)
    same.load_state_dict(opt.state_dict())
    assert same.param_groups[0]["momentum"] == 0.9
    for step in (1, 2):
        _set_grads(step, params, other)
        opt.step()
        same.step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)
