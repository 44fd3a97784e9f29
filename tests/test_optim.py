"""Circuit optimizers against torch.optim: dense equivalence, masked exactness, per-slice trajectories,
block-sparse state and state_dict round-trips."""

import copy

import pytest
import torch

from ct_fast import CircuitAdamW, CircuitSGD, CTFastError, ParamSelection
from ct_fast.testing import assert_close

ADAMW = [dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-6), dict(lr=1e-2, amsgrad=True),
         dict(lr=1e-2, maximize=True, weight_decay=0.0)]
SGD = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
       dict(lr=0.05, momentum=0.5, dampening=0.3, maximize=True)]


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 11), (1,), ()]
    return [torch.randn(s, generator=g, dtype=torch.float32).to(dtype).requires_grad_() for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _pairs():
    return ([(CircuitAdamW, torch.optim.AdamW, kw) for kw in ADAMW]
            + [(CircuitSGD, torch.optim.SGD, kw) for kw in SGD])


@pytest.mark.parametrize("ours,theirs,kw", _pairs(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_dense_matches_torch(ours, theirs, kw):
    a, b = _params(), _params()
    opt_a = ours(a, **kw)
    opt_b = theirs(b, foreach=False, **kw)
    for step in range(5):
        for p, q, g in zip(a, b, _grads(a, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert_close(p, q, name="param")


def _circuit(params, step):
    """Alternating row/column selections, some params frozen, one full."""
    if step % 2 == 0:
        return {params[0]: ParamSelection(0, 7, ((1, 3), (5, 6))), params[1]: ParamSelection(0, 5, ((0, 5),)),
                params[4]: ParamSelection(0, 1, ((0, 1),))}
    return {params[0]: ParamSelection(0, 7, ((2, 4),)), params[2]: ParamSelection(0, 3, ((0, 1),))}


@pytest.mark.parametrize("ours,theirs,kw", _pairs(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_masked_rows_follow_their_own_trajectory(ours, theirs, kw):
    """Every row equals a torch optimizer run on that row alone over the steps in which it was selected;
    rows never selected are bit-identical, and their state is never allocated."""
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = ours(params, **kw)
    # per (param, row): its own torch optimizer on a 1-row copy
    solo = {}
    for step in range(6):
        sel = _circuit(params, step)
        opt.set_circuit(sel)
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            s = sel.get(p)
            rows = set(s.index().tolist()) if s else set()
            view = p.detach().reshape(p.shape[0] if p.dim() else 1, -1)
            for r in range(view.shape[0]):
                if r not in rows:
                    assert torch.equal(view[r], before[i].reshape(view.shape)[r]), (i, r, step)
                    continue
                if (i, r) not in solo:
                    q = start[i].reshape(view.shape)[r].clone().requires_grad_()
                    solo[i, r] = (q, theirs([q], foreach=False, **kw))
                q, o = solo[i, r]
                q.grad = g.reshape(view.shape)[r].clone()
                o.step()
                assert_close(view[r], q, name=f"param {i} row {r} step {step}")
    # state exists only for rows that were ever selected
    assert opt.num_state_rows() == 4 + 5 + 1 + 1  # p0 rows {1,2,3,5}, p1 all 5, p2 row 0, p4
    assert torch.equal(params[3].detach(), start[3])
    assert 3 not in [i for i, p in enumerate(params) if p in opt.state]


def test_state_dict_round_trip_mid_run():
    def run(split):
        params = _params(seed=3)
        opt = CircuitAdamW(params, lr=1e-2, weight_decay=0.05)
        for step in range(6):
            if split and step == 3:
                sd = copy.deepcopy(opt.state_dict())
                params2 = [p.detach().clone().requires_grad_() for p in params]
                opt = CircuitAdamW(params2, lr=1e-2, weight_decay=0.05)
                opt.load_state_dict(sd)
                params = params2
            if step in (0, 2, 4):  # the circuit persists across the round-trip at step 3
                opt.set_circuit(_circuit(params, step))
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.step()
        return params

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_bool_masks_and_errors():
    params = _params()
    opt = CircuitSGD(params, lr=0.1)
    mask = torch.zeros(7, 5, dtype=torch.bool)
    mask[:, 2] = True  # a column
    opt.set_circuit({params[0]: mask})
    for p in params:
        p.grad = torch.ones_like(p)
    before = params[0].detach().clone()
    opt.step()
    changed = params[0].detach() != before
    assert torch.equal(changed, mask)
    bad = torch.zeros(7, 5, dtype=torch.bool)
    bad[0, 0] = bad[1, 1] = True
    with pytest.raises(CTFastError, match="neither whole rows nor whole columns"):
        opt.set_circuit({params[0]: bad})
    with pytest.raises(CTFastError, match=r"has shape \(5, 7\)"):
        opt.set_circuit({params[0]: torch.ones(5, 7, dtype=torch.bool)})
    with pytest.raises(CTFastError, match="nesterov"):
        CircuitSGD(params, lr=0.1, nesterov=True)


def test_bf16_params_get_fp32_math():
    p32 = _params(dtype=torch.float32)
    p16 = [p.detach().to(torch.bfloat16).requires_grad_() for p in p32]
    ref = [p.detach().to(torch.bfloat16).float().requires_grad_() for p in p32]
    o16, oref = CircuitAdamW(p16, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(3):
        grads = _grads(p32, step)
        for a, b, g in zip(p16, ref, grads):
            a.grad, b.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        o16.step()
        oref.step()
        with torch.no_grad():
            for b in ref:
                b.copy_(b.to(torch.bfloat16).float())  # the reference also stores bf16 weights
    for a, b in zip(p16, ref):
        assert a.dtype == torch.bfloat16
        assert_close(a.float(), b, dtype=torch.bfloat16)
    assert all(s["exp_avg"].dtype == torch.float32 for s in o16.state.values())


def test_lr_scheduler_compatible():
    params = _params()
    opt = CircuitAdamW(params, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_dense_state_moves_to_a_column_selection():
    """Dense steps keep state along rows; a later column selection re-lays it out exactly."""
    p = torch.randn(6, 5, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, ref = CircuitAdamW([p], lr=1e-2), torch.optim.AdamW([q], lr=1e-2, foreach=False)
    for step in range(3):
        g = torch.randn(6, 5, generator=torch.Generator().manual_seed(step))
        if step == 2:
            ours.set_circuit({p: ParamSelection(1, 5, ((1, 3),))})
            before = p.detach().clone()
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        if step < 2:
            ref.step()
    # step 2 of the reference on the selected columns only
    cols = q.detach()[:, 1:3].clone().requires_grad_()
    state = ref.state[q]
    solo = torch.optim.AdamW([cols], lr=1e-2, foreach=False)
    solo.state[cols] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][:, 1:3].clone(),
                        "exp_avg_sq": state["exp_avg_sq"][:, 1:3].clone()}
    cols.grad = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))[:, 1:3]
    solo.step()
    assert_close(p.detach()[:, 1:3], cols.detach())
    assert torch.equal(p.detach()[:, [0, 3, 4]], before[:, [0, 3, 4]])
