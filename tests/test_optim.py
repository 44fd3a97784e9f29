"""Circuit optimizers against torch.optim: dense equivalence, masked exactness, per-slice trajectories,
block-sparse state, bounded state pools (LRU eviction, no growth, no host syncs) and state_dict round-trips."""

import copy

import pytest
import torch

from ct_fast import CircuitAdamW, CircuitSGD, CTFastError, ParamSelection, ops
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


@pytest.mark.parametrize("ours,theirs,default,group", [
    (CircuitAdamW, torch.optim.AdamW, dict(lr=1e-2), dict(amsgrad=True)),
    (CircuitAdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True), dict(amsgrad=False)),
    (CircuitSGD, torch.optim.SGD, dict(lr=0.05), dict(momentum=0.9, nesterov=True)),
    (CircuitSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9), dict(momentum=0.0)),
    (CircuitSGD, torch.optim.SGD, dict(lr=0.05), "OneCycleLR")], ids=lambda x: getattr(x, "__name__", str(x)))
def test_param_groups_own_amsgrad_and_momentum(ours, theirs, default, group):
    """A param group's own amsgrad / momentum (also one a scheduler sets before the first step: OneCycleLR
    cycles SGD's momentum in) is honoured as torch does; switched on after the group's first step, where its
    rows were given no state for it, the step is refused before anything is written."""
    a, b = _params(), _params()
    cycle = group == "OneCycleLR"
    split = lambda ps: [dict(params=ps[:2]), dict(params=ps[2:], **({} if cycle else group))]  # noqa: E731
    opt_a, opt_b = ours(split(a), **default), theirs(split(b), foreach=False, **default)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10) for o in (opt_a, opt_b)] if cycle \
        else []
    for step in range(5):
        for p, q, g in zip(a, b, _grads(a, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for s in scheds:
            s.step()
    for p, q in zip(a, b):
        assert_close(p, q, name="param")
    key, on = ("amsgrad", True) if ours is CircuitAdamW else ("momentum", 0.9)
    off = next((g for g in opt_a.param_groups if not g[key]), None)
    if off is None:
        return
    off[key] = on
    before = [p.detach().clone() for p in a]
    with pytest.raises(CTFastError, match=f"param group .* now needs optimizer state.*before the first step"):
        opt_a.step()
    assert all(torch.equal(p, q) for p, q in zip(a, before))


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
    assert all(pool.t["exp_avg"].dtype == torch.float32 for pool in o16._pools.values())


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


# ---- bounded state pools (state_capacity) ------------------------------------------------------------

class _PoolModel:
    """Python model of one shared slot pool: members join in order (their rows become consecutive global rows,
    their budgets append free slots); rows keep their slots; new rows take free slots (lowest index first),
    then the slot whose row was selected least recently (ties: the lower global row), never one selected in the
    same step."""

    def __init__(self):
        self.owner, self.last, self.steps, self.base, self.rows = [], [], [], {}, 0

    def join(self, member, n_rows, budget):
        if member not in self.base:
            self.base[member], self.rows = self.rows, self.rows + n_rows
            self.owner, self.last, self.steps = self.owner + [-1] * budget, self.last + [0] * budget, \
                self.steps + [0] * budget

    def select(self, rows, now) -> list:
        """Select global ``rows`` (in the step's order) at optimizer step ``now``; returns those that (re)start
        from zero."""
        slot_of = {r: s for s, r in enumerate(self.owner) if r >= 0}
        kept = {slot_of[r] for r in rows if r in slot_of}
        order = sorted((s for s in range(len(self.owner)) if s not in kept),
                       key=lambda s: (0, s, 0) if self.owner[s] < 0 else (1, self.last[s], self.owner[s]))
        fresh = [r for r in rows if r not in slot_of]
        for r, s in zip(fresh, order):
            self.owner[s], self.steps[s], slot_of[r] = r, 0, s
        for r in rows:
            self.last[slot_of[r]] = now
            self.steps[slot_of[r]] += 1
        return fresh


# (shape, sliced axis) of the small parameters of the pool tests: the first two have rows of width 4 and share
# a pool (3 + 3 slots at state_capacity=0.5); the third is alone (4 slots)
_POOL_PARAMS = [((6, 4), 0), ((4, 5), 1), ((7, 1), 0)]
_BUDGETS = [3, 3, 4]
_POOL_OF = [0, 0, 1]  # the pool of each parameter


def _pool_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s, _ in _POOL_PARAMS]


def _reserve(opt, params):
    opt.reserve_state({p: dim for p, (_, dim) in zip(params, _POOL_PARAMS)})


def _random_masks(params, gen):
    """{param index: bool mask} of random rows along each parameter's axis, some parameters left out; the rows
    of one pool never exceed its slots, but one parameter may take more than it brought."""
    masks, free = {}, [sum(b for b, k in zip(_BUDGETS, _POOL_OF) if k == pool) for pool in (0, 1)]
    for i, (p, (_, dim)) in enumerate(zip(params, _POOL_PARAMS)):
        n, pool = p.shape[dim], _POOL_OF[i]
        if torch.rand((), generator=gen) < 0.2 or free[pool] == 0:
            continue
        k = int(torch.randint(1, min(n, free[pool]) + 1, (), generator=gen))
        free[pool] -= k
        rows = torch.zeros(n, dtype=torch.bool)
        rows[torch.randperm(n, generator=gen)[:k]] = True
        view = [1] * p.dim()
        view[dim] = n
        masks[i] = rows.view(view).expand(p.shape).clone()
    return masks


def _select_in_models(models, params, masks, now) -> dict:
    """Apply one step's masks to the pool models; ``{(param index, row): True}`` for rows that restart."""
    fresh = {}
    for pool, model in enumerate(models):
        mine = [i for i in sorted(masks) if _POOL_OF[i] == pool]
        wanted = [model.base[i] + r for i in mine for r in _rows_of_mask(masks[i], _POOL_PARAMS[i][1])]
        for g in model.select(wanted, now):
            i = max(j for j in mine if model.base[j] <= g)
            fresh[i, g - model.base[i]] = True
    return fresh


def _pool_models(params):
    models = [_PoolModel(), _PoolModel()]
    for i, (p, (_, dim)) in enumerate(zip(params, _POOL_PARAMS)):
        models[_POOL_OF[i]].join(i, p.shape[dim], _BUDGETS[i])
    return models


def _rows_of_mask(mask, dim):
    return mask.movedim(dim, 0).reshape(mask.shape[dim], -1)[:, 0].nonzero().flatten().tolist()


def _row_selection(n, rows):
    return ParamSelection(0, n, tuple((r, r + 1) for r in rows))


def _assert_same_state(sd_a, sd_b):
    """Two optimizer state_dicts hold bit-identical state, pools, clock and groups."""
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for i, state in sd_a["state"].items():
        assert state.keys() == sd_b["state"][i].keys()
        for k, v in state.items():
            assert torch.equal(v, sd_b["state"][i][k]) if isinstance(v, torch.Tensor) else v == sd_b["state"][i][k]
    assert len(sd_a["pools"]) == len(sd_b["pools"])
    for a, b in zip(sd_a["pools"], sd_b["pools"]):
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k
    assert sd_a["clock"] == sd_b["clock"] and sd_a["param_groups"] == sd_b["param_groups"]


def _check_pool(pool, model):
    """The optimizer's pool equals the Python model: owners, step counts, time stamps, slot <-> owner links."""
    owner = pool.t["owner"].tolist()
    assert owner == model.owner
    assert pool.t["step"][:-1].tolist() == model.steps  # the last entry is scratch
    assert [t for t, o in zip(pool.t["last_used"].tolist(), owner) if o >= 0] == \
        [t for t, o in zip(model.last, owner) if o >= 0]
    expected_slot = [-1] * model.rows
    for s, r in enumerate(owner):
        if r >= 0:
            expected_slot[r] = s
    assert pool.t["slot"].tolist() == expected_slot


def _pools_of(opt, params):
    return [opt._pools[opt._pool_of[params[0]]], opt._pools[opt._pool_of[params[2]]]]


@pytest.mark.parametrize("ours,kw", [(CircuitAdamW, dict(lr=1e-2)), (CircuitSGD, dict(lr=0.05, momentum=0.9))],
                         ids=["adamw", "sgd"])
def test_bounded_pool_never_grows(ours, kw):
    """200 steps of random circuits: the pools are allocated once, keep their storage and size, never hold
    more rows than their capacity, share their slots among their parameters (one parameter may hold more
    than it brought), and evict exactly as the LRU model says."""
    params = _pool_params()
    opt = ours([{"params": params[:2]}, {"params": params[2:], "state_capacity": 4}], state_capacity=0.5, **kw)
    _reserve(opt, params)
    models = _pool_models(params)
    gen = torch.Generator().manual_seed(7)
    storage, over_budget = None, 0
    for step in range(200):
        masks = _random_masks(params, gen)
        opt.set_circuit({params[i]: m for i, m in masks.items()})
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
        _select_in_models(models, params, masks, step + 1)
        pools = _pools_of(opt, params)
        for pool, model in zip(pools, models):
            if pool.allocated:
                _check_pool(pool, model)
        over_budget += int((opt.param_state(params[0]).get("slot", torch.zeros(0)) >= 0).sum()) > _BUDGETS[0]
        assert opt.num_state_rows() <= opt.state_capacity_rows()
        if all(pool.allocated for pool in pools):
            now = [v.data_ptr() for pool in pools for v in pool.t.values()]
            assert storage in (None, now)  # the same tensors, never reallocated
            if storage is None:
                storage, rows, nbytes = now, opt.state_capacity_rows(), opt.state_bytes()
            assert (opt.state_capacity_rows(), opt.state_bytes()) == (rows, nbytes)
    assert storage is not None and rows == sum(_BUDGETS)
    assert opt.num_state_rows() == sum(_BUDGETS)  # 200 steps fill every pool
    assert over_budget > 5  # the first parameter often held more slots than it brought


@pytest.mark.parametrize("ours,theirs,kw", _pairs(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_evicted_rows_restart_and_kept_rows_continue(ours, theirs, kw):
    """Every row follows a torch optimizer run on that row alone, which restarts from scratch whenever the row
    re-enters after losing its slot (to a row of its own or of another parameter of its pool); rows not
    selected are bit-identical."""
    params = _pool_params(seed=1)
    start = [p.detach().clone() for p in params]
    opt = ours(params, state_capacity=0.5, **kw)
    _reserve(opt, params)
    models = _pool_models(params)
    gen = torch.Generator().manual_seed(3)
    solo, restarts = {}, 0
    for step in range(30):
        masks = _random_masks(params, gen)
        opt.set_circuit({params[i]: m for i, m in masks.items()})
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        fresh = _select_in_models(models, params, masks, step + 1)
        restarts += sum(key in solo for key in fresh)
        for i, (p, g, (_, dim)) in enumerate(zip(params, grads, _POOL_PARAMS)):
            rows = _rows_of_mask(masks[i], dim) if i in masks else []
            for r in range(p.shape[dim]):
                now = p.detach().movedim(dim, 0)[r]
                if r not in rows:
                    assert torch.equal(now, before[i].movedim(dim, 0)[r]), (i, r, step)
                    continue
                if (i, r) in fresh:  # a fresh optimizer from the row's current value
                    q = before[i].movedim(dim, 0)[r].clone().requires_grad_()
                    solo[i, r] = (q, theirs([q], foreach=False, **kw))
                q, o = solo[i, r]
                q.grad = g.movedim(dim, 0)[r].clone()
                o.step()
                assert_close(now, q, name=f"param {i} row {r} step {step}")
    assert restarts > 5  # the run did evict and re-select rows
    assert any(not torch.equal(p, s) for p, s in zip(params, start))


def test_lru_evicts_the_row_idle_longest():
    p = torch.zeros(4, 3, requires_grad=True)
    opt = CircuitAdamW([p], lr=1e-2, state_capacity=2)

    def select(*rows):
        mask = torch.zeros(4, 3, dtype=torch.bool)
        mask[list(rows)] = True
        opt.set_circuit({p: mask})
        p.grad = torch.ones(4, 3)
        opt.step()
        state = opt.param_state(p)
        slot, step = state["slot"], state["step"]
        return {r: int(step[slot[r]]) for r in range(4) if slot[r] >= 0}  # row -> its step count

    assert select(0) == {0: 1}
    assert select(1) == {0: 1, 1: 1}
    assert select(0) == {0: 2, 1: 1}
    assert select(2) == {0: 2, 2: 1}  # row 1 (idle since step 2) goes, not row 0 (used at step 3)
    assert select(1) == {1: 1, 2: 1}  # row 1 restarts; row 0 is now the one idle longest
    assert select(1, 2) == {1: 2, 2: 2}
    assert opt.state_capacity_rows() == 2 and opt.num_state_rows() == 2
    # slot, owner, last_used; step and moments with their scratch row
    assert opt.state_bytes() == (4 + 2 + 2) * 8 + 3 * 4 + 2 * 3 * 3 * 4


def test_parameters_of_one_width_share_a_pool():
    """Rows of one width share the slots of their param group: a whole parameter fits a pool of fractional
    capacity when the others leave room, rows of another width or group never take those slots, and a row
    evicted by another parameter restarts."""
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(4, 8, requires_grad=True)  # rows / columns of 4
    c, d = torch.randn(8, 3, requires_grad=True), torch.randn(8, 4, requires_grad=True)  # other width / group
    opt = CircuitAdamW([{"params": [a, b, c]}, {"params": [d]}], lr=1e-2, state_capacity=0.5)
    opt.reserve_state({a: 0, b: 1, c: 0, d: 0})
    assert [opt.pool_capacity(p) for p in (a, b, c, d)] == [8, 8, 4, 4]
    opt.set_circuit({a: ParamSelection(0, 8, ((0, 8),)), c: ParamSelection(0, 8, ((0, 4),)),
                     d: ParamSelection(0, 8, ((0, 4),))})  # all of a: 8 rows in a pool of 4 + 4
    for p in (a, b, c, d):
        p.grad = torch.randn_like(p)
    opt.step()
    assert int((opt.param_state(a)["slot"] >= 0).sum()) == 8 and opt.num_state_rows() == 16
    opt.set_circuit({b: ParamSelection(1, 8, ((0, 3),))})  # b's columns evict a's rows idle longest: 0, 1, 2
    opt.step()
    assert (opt.param_state(a)["slot"] >= 0).tolist() == [False] * 3 + [True] * 5
    with pytest.raises(CTFastError, match=r"the circuit selects 9 rows of width 4 in param group 0 .* pool these "
                                          r"parameters share holds 8 rows \(state_capacity=0.5\); raise "
                                          r"state_capacity to at least 0.563"):
        opt.set_circuit({a: ParamSelection(0, 8, ((0, 8),)), b: ParamSelection(1, 8, ((0, 1),))})
        opt.step()


def test_a_parameter_joining_later_grows_its_pool_once():
    """A hand-set circuit that brings a new parameter of a known width into an allocated pool grows the pool
    once, keeping every held row's state: the run equals one whose pool was reserved up front."""
    def run(reserve):
        a, b = _pool_params(seed=9)[:2]  # rows of width 4: a by rows, b by columns
        opt = CircuitAdamW([a, b], lr=1e-2, state_capacity=0.5)
        if reserve:
            opt.reserve_state({a: 0, b: 1})
        for step, sel in enumerate([{a: _row_selection(6, (0, 2))}, {a: _row_selection(6, (2, 3)),
                                    b: ParamSelection(1, 5, ((1, 4),))}, {a: _row_selection(6, (0, 3))}]):
            opt.set_circuit(sel)
            for p, g in zip((a, b), _grads((a, b), step)):
                p.grad = g
            opt.step()
            if step == 0:
                assert opt.state_capacity_rows() == (6 if reserve else 3)
        assert opt.state_capacity_rows() == 6 and opt.num_state_rows() == 6
        return a, b

    assert all(torch.equal(x, y) for x, y in zip(run(False), run(True)))


def test_full_capacity_equals_unbounded():
    """state_capacity None, 1.0 and an int >= the rows give the same pools and bit-identical trajectories."""
    runs = []
    for cap in (None, 1.0, 100):
        params = _params()
        opt = CircuitAdamW(params, lr=1e-2, state_capacity=cap)
        for step in range(6):
            opt.set_circuit(_circuit(params, step))
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.step()
        # every row brings a slot: a pool per selected parameter (the 1-element vector is never selected)
        assert sorted(pool.capacity for pool in opt._pools.values()) == [1, 3, 5, 7]
        runs.append(params)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_state_capacity_validation_and_sizes():
    params = _params()
    for bad in (0, -1, 0.0, 1.5, True, "0.5", [1]):
        with pytest.raises(CTFastError, match="state_capacity"):
            CircuitAdamW(params, state_capacity=bad)
    with pytest.raises(CTFastError, match="state_capacity"):
        CircuitSGD([{"params": params[:1], "state_capacity": 2.0}], lr=0.1)
    from ct_fast.state_pool import pool_size
    assert [pool_size(0.3, 10), pool_size(0.25, 7), pool_size(0.01, 5), pool_size(3, 2), pool_size(None, 4)] == \
        [3, 2, 1, 2, 4]


def test_selection_over_capacity_raises_and_writes_nothing():
    """The step validates every group first: an oversized selection in the last group leaves parameters and
    pools untouched (no evictions in earlier groups either); dense steps need full pools."""
    a, b = torch.randn(6, 4, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    opt = CircuitAdamW([{"params": [a]}, {"params": [b], "state_capacity": 0.25}], lr=1e-2, state_capacity=2)
    for rows_a, rows_b in (((0, 1), (0, 1)), ((2,), (2,))):
        opt.set_circuit({a: _row_selection(6, rows_a), b: _row_selection(8, rows_b)})
        a.grad, b.grad = torch.randn(6, 4), torch.randn(8, 3)
        opt.step()
    before = copy.deepcopy((a, b, opt.state_dict()))
    opt.set_circuit({a: _row_selection(6, (4, 5)), b: _row_selection(8, (1, 3, 5))})  # a evicts; b has 2 slots
    with pytest.raises(CTFastError, match=r"selects 3 rows of width 3 in param group 1 \(3 of the 8 rows \(axis 0\) "
                                          r"of a parameter of shape \(8, 3\)\), but .* holds 2 rows "
                                          r"\(state_capacity=0.25\); raise state_capacity to at least 0.375"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    _assert_same_state(opt.state_dict(), before[2])
    opt.set_circuit(None)  # dense steps need every row of a pool
    with pytest.raises(CTFastError, match=r"a dense step \(no circuit\) updates 6 rows of width 4 in param group 0"):
        opt.step()


def test_dense_state_moves_axis_only_into_a_full_pool():
    """Dense steps fill a full pool; moving that state to columns needs every column to fit as well."""
    p = torch.randn(5, 8, requires_grad=True)
    opt = CircuitAdamW([p], lr=1e-2, state_capacity=5)  # 5 of 5 rows, but only 5 of 8 columns
    p.grad = torch.randn(5, 8)
    opt.step()
    assert opt.num_state_rows() == opt.state_capacity_rows() == 5
    opt.set_circuit({p: ParamSelection(1, 8, ((0, 2),))})
    with pytest.raises(CTFastError, match="to axis 1 needs 8 rows of state, but state_capacity=5 gives 5"):
        opt.step()


@pytest.mark.parametrize("ours,kw", [(CircuitAdamW, dict(lr=1e-2, weight_decay=0.05)),
                                     (CircuitSGD, dict(lr=0.05, momentum=0.9, nesterov=True))], ids=["adamw", "sgd"])
def test_state_dict_round_trip_with_capacity(ours, kw):
    """Saving and loading mid-run (pools full, evictions before and after) continues bit-identically, also into
    an optimizer built with another state_capacity (the saved groups carry theirs)."""
    def run(split):
        params = _pool_params(seed=5)
        opt = ours(params, state_capacity=0.5, **kw)
        _reserve(opt, params)
        gen = torch.Generator().manual_seed(11)
        for step in range(40):
            if split and step == 25:
                sd = copy.deepcopy(opt.state_dict())
                params = [p.detach().clone().requires_grad_() for p in params]
                opt = ours(params, state_capacity=None, **kw)
                opt.load_state_dict(sd)
                assert opt.param_groups[0]["state_capacity"] == 0.5
            opt.set_circuit({params[i]: m for i, m in _random_masks(params, gen).items()})
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.step()
        return params, opt

    (pa, oa), (pb, ob) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    _assert_same_state(oa.state_dict(), ob.state_dict())


@pytest.mark.parametrize("capacity", [None, 0.7])
@pytest.mark.parametrize("ours,kw", [(CircuitAdamW, dict(lr=1e-2)), (CircuitSGD, dict(lr=0.05, momentum=0.9))],
                         ids=["adamw", "sgd"])
def test_state_of_other_parameters_is_refused(ours, kw, capacity):
    """A state loaded into parameters of other shapes (listed in another order, another model) is refused before
    anything changes: its rows would share moments with another parameter's, or index past the pool."""
    params = _pool_params(seed=5)
    opt = ours(params, state_capacity=capacity, **kw)
    _reserve(opt, params)
    gen = torch.Generator().manual_seed(11)
    for step in range(3):
        opt.set_circuit({params[i]: m for i, m in _random_masks(params, gen).items()})
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    shuffled = [p.detach().clone().requires_grad_() for p in reversed(params)]
    assert [p.shape for p in shuffled] != [p.shape for p in params]
    other = ours(shuffled, state_capacity=capacity, **kw)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CTFastError, match="saved for another model, with the parameters in another order"):
        other.load_state_dict(sd)
    _assert_same_state(other.state_dict(), before)


def _per_parameter_layout(sd, pools: bool) -> dict:
    """``sd`` in an earlier layout: a pool per parameter (``pools``), or rows appended as they entered (no
    owner/last_used, no clock, no state_capacity)."""
    from ct_fast.state_pool import per_parameter_states
    moments = [k for k in ("exp_avg", "exp_avg_sq", "momentum_buffer") if k in sd["pools"][0]]
    owners = {}
    for saved in sd["pools"]:
        for pid, _, base, n_rows, _ in saved["members"]:
            owners[pid] = (saved["owner"], saved["last_used"], base)
    state = {}
    for pid, s in per_parameter_states(sd)["state"].items():
        held = (s["slot"] >= 0).nonzero().flatten()
        old = s["slot"][held]
        slot = torch.full_like(s["slot"], -1)
        slot[held] = torch.arange(held.numel())
        new = {"dim": s["dim"], "slot": slot, "step": s["step"][old]}
        new.update({k: s[k][old] for k in moments})
        if pools:
            new["owner"], new["last_used"] = held.clone(), owners[pid][1][old]
        state[pid] = new
    out = {**sd, "state": state}
    del out["pools"]
    if not pools:
        del out["clock"]
        out["param_groups"] = [{k: v for k, v in g.items() if k != "state_capacity"} for g in sd["param_groups"]]
    return out


@pytest.mark.parametrize("pools", [False, True], ids=["appended_rows", "pool_per_parameter"])
def test_loads_state_of_earlier_layouts(pools):
    """A state_dict of an earlier layout loads into the shared pools and continues bit-identically (with a
    bounded pool per parameter: evicting the same rows, their time stamps kept)."""
    def run(legacy):
        params = _pool_params(seed=4)
        cap = 0.5 if pools else None
        opt = CircuitAdamW(params, lr=1e-2, state_capacity=cap)
        _reserve(opt, params)
        gen = torch.Generator().manual_seed(2)
        for step in range(12):
            if legacy and step == 6:
                sd = _per_parameter_layout(copy.deepcopy(opt.state_dict()), pools)
                params = [p.detach().clone().requires_grad_() for p in params]
                opt = CircuitAdamW(params, lr=1e-2, state_capacity=cap)
                opt.load_state_dict(sd)
            opt.set_circuit({params[i]: m for i, m in _random_masks(params, gen).items()})
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.step()
        return params

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


SYNC_EVENTS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal",
               "aten::masked_select"}


def _profiled_events(fn) -> set:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("backend", ["torch", "default"])
@pytest.mark.parametrize("ours,kw", [(CircuitAdamW, dict(lr=1e-2)), (CircuitSGD, dict(lr=0.05, momentum=0.9))],
                         ids=["adamw", "sgd"])
def test_steady_state_step_does_not_synchronise(ours, kw, backend, monkeypatch):
    """With a bounded pool and circuits that evict every step, a step issues no host synchronisation."""
    if backend == "torch":
        monkeypatch.setenv("CT_FAST_BACKEND", "torch")
    else:
        monkeypatch.delenv("CT_FAST_BACKEND", raising=False)
    assert {"aten::is_nonzero", "aten::_local_scalar_dense"} & _profiled_events(lambda: bool(torch.ones(2).any()))
    params = [torch.randn(6, 4, requires_grad=True), torch.randn(4, 6, requires_grad=True)]
    opt = ours(params, state_capacity=2, **kw)
    for step in range(4):
        rows = ((2 * step % 6, 2 * step % 6 + 2),)  # rows {0,1}, {2,3}, {4,5}, {0,1}: each step evicts both slots
        opt.set_circuit({params[0]: ParamSelection(0, 6, rows), params[1]: ParamSelection(1, 6, rows)})
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        events = _profiled_events(opt.step)
        if step:  # after the warm-up step that allocates the pools
            assert not events & SYNC_EVENTS, events & SYNC_EVENTS
            assert "aten::argsort" in events or "aten::sort" in events  # the eviction ran under the profiler
            native = any(e.startswith("ct_fast::masked_") for e in events)  # the op dispatched to a kernel
            assert native == (backend == "default" and ops.native() is not None)
    assert opt.num_state_rows() == 4


def test_lr_as_a_tensor_follows_a_scheduler():
    """``lr=torch.tensor(...)`` (torch's capturable convention: the kernels read it on the device, no host value
    per step) trains as a float lr does, and LR schedulers update it in place."""
    from ct_fast.testing import random_batch, tiny_model

    runs = []
    for lr in (1e-2, torch.tensor(1e-2)):
        model = tiny_model("llama")
        opt = CircuitAdamW(model.parameters(), lr=lr, model=model, top_n=25)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, total_iters=3)
        for s in range(3):
            b = random_batch(37, seed=s)
            model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        runs.append((model, opt))
    (a, _), (b, opt) = runs
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and float(opt.param_groups[0]["lr"]) == pytest.approx(5e-3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


# ---- device-side skip flag (skip_nonfinite, torch.amp.GradScaler) ------------------------------------

def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {k: {n: t.clone() for n, t in pool.t.items()}
                                                   for k, pool in opt._pools.items()}


@pytest.mark.parametrize("ours,kw", [(CircuitAdamW, dict(lr=1e-2)), (CircuitSGD, dict(lr=0.05, momentum=0.9))],
                         ids=["adamw", "sgd"])
def test_skip_nonfinite_step_writes_nothing(ours, kw):
    """A step whose applied gradient holds a NaN writes nothing — parameters, moments, step counts, and the slots
    it would have evicted — and the run continues exactly as one that never took that step."""
    def run(bad_step):
        params = _pool_params(seed=2)
        opt = ours(params, state_capacity=0.5, skip_nonfinite=True, **kw)
        _reserve(opt, params)
        gen = torch.Generator().manual_seed(5)
        skipped = []
        for step in range(12):
            masks = _random_masks(params, gen)
            if bad_step is None and step == 6:
                continue  # the reference never sees the bad step
            opt.set_circuit({params[i]: m for i, m in masks.items()})
            grads = _grads(params, step)
            if step == bad_step:
                i = min(masks)
                grads[i][masks[i]] = float("nan")  # a selected entry
                before = _snapshot(opt, params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            skipped.append(0.0 if opt.step_skipped is None else float(opt.step_skipped))  # None: nothing applied
            if step == bad_step:
                after = _snapshot(opt, params)
                assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
                assert before[1].keys() == after[1].keys()
                for k in before[1]:
                    assert all(torch.equal(before[1][k][n], after[1][k][n]) for n in before[1][k]), (k,)
        return params, skipped

    (pa, sa), (pb, sb) = run(6), run(None)
    assert sa == [0.0] * 6 + [1.0] + [0.0] * 5 and sb == [0.0] * 11
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


def test_skip_flag_steps_do_not_synchronise():
    """With skip_nonfinite the flag is decided on the device: a steady-state step issues no host sync."""
    params = [torch.randn(6, 4, requires_grad=True), torch.randn(4, 6, requires_grad=True)]
    opt = CircuitAdamW(params, lr=1e-2, state_capacity=2, skip_nonfinite=True)
    for step in range(3):
        rows = ((2 * step % 6, 2 * step % 6 + 2),)
        opt.set_circuit({params[0]: ParamSelection(0, 6, rows), params[1]: ParamSelection(1, 6, rows)})
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        events = _profiled_events(opt.step)
        if step:
            assert not events & SYNC_EVENTS, events & SYNC_EVENTS


@pytest.mark.parametrize("circuit", [False, True], ids=["dense", "circuit"])
def test_grad_scaler_skips_and_unscales_like_torch(circuit):
    """``torch.amp.GradScaler`` hands CircuitAdamW its scale and flag (``_step_supports_amp_scaling``): the step
    unscales on the device and skips overflow steps without a host read, and the run (parameters, scale) equals
    torch.optim.AdamW under its own scaler."""
    a, b = _params(seed=3)[:3], _params(seed=3)[:3]
    ours, ref = CircuitAdamW(a, lr=1e-2), torch.optim.AdamW(b, lr=1e-2, foreach=False)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    sel = {a[0]: ParamSelection(0, 7, ((1, 4),)), a[2]: ParamSelection(1, 11, ((3, 9),))}
    for step in range(6):
        grads = _grads(a, step)
        if step in (2, 3):
            grads[0][1, 1] = float("inf")  # an overflow in a selected row
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = sa.scale(g.clone()), sb.scale(g.clone())
        if circuit:
            ours.set_circuit(sel)
            for p, q in zip(a, b):  # the reference: the same rows (torch updates rows with a zero grad too)
                q.grad = q.grad.clone()
        sa.step(ours)
        sa.update()
        if not circuit:
            sb.step(ref)
            sb.update()
    assert sa.get_scale() == 2.0 ** 8  # halved at each of the two overflow steps
    if not circuit:
        assert sb.get_scale() == sa.get_scale()
        for p, q in zip(a, b):
            assert_close(p, q, name="param")
    else:  # rows outside the circuit never moved; the circuit's rows took the 4 finite steps
        start = _params(seed=3)[:3]
        assert torch.equal(a[1], start[1]) and torch.equal(a[0][[0, 4, 5, 6]], start[0][[0, 4, 5, 6]])
        assert not torch.equal(a[0][1:4], start[0][1:4])
        s = ours.param_state(a[0])
        assert s["step"][s["slot"][1:4]].tolist() == [4.0, 4.0, 4.0]


def test_set_circuit_reserves_every_tunable_parameter():
    """A Circuit of a graph registers every parameter its circuits can select, so a drifting hand-set circuit
    allocates each shared pool once; only the circuit's rows move."""
    from ct_fast import attribute
    from ct_fast.testing import random_batch, tiny_model

    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-2, state_capacity=0.5)
    storage = None
    for seed in range(3):
        batch = random_batch(37, seed=seed)
        circuit = attribute(model, batch).top_n(6)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.set_circuit(circuit, model)
        if storage is None:  # registered before the first step: every tunable parameter has its pool's slots
            names = circuit.graph.tunable_params
            assert all(opt.pool_capacity(p) > 0 for n, p in model.named_parameters() if n in names)
        model.zero_grad()
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
        opt.step()
        now = {k: pool.t["step"].data_ptr() for k, pool in opt._pools.items() if len(k) == 3}
        assert storage in (None, now)
        storage = now
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        selected = {s.param for s in circuit.graph.param_slices(circuit.upstream, circuit.downstream)}
        assert moved and moved <= selected


def _own_slot_run(params, steps, gen_seed=5, opt=None):
    """``steps`` random-circuit steps of a CircuitAdamW with a slot for every row (state_capacity=None)."""
    opt = opt or CircuitAdamW(params, lr=1e-2, weight_decay=0.1)
    if not opt._pools:
        _reserve(opt, params)
    gen = torch.Generator().manual_seed(gen_seed)
    for step in range(steps):
        masks = _random_masks(params, gen)
        opt.set_circuit({params[i]: m for i, m in masks.items()})
        for p, g in zip(params, _grads(params, step + gen_seed)):
            p.grad = g
        opt.step()
    return opt


def test_slot_per_row_pools_give_each_row_its_own_slot():
    """state_capacity=None: a selected row's slot is the row itself (no search); rows never selected hold none."""
    params = _pool_params(seed=6)
    opt = _own_slot_run(params, 3)
    assert len(opt._pools) == 3 and all(pool.own_slots for pool in opt._pools.values())
    held = []
    for pool in opt._pools.values():
        slot, owner = pool.t["slot"], pool.t["owner"]
        held.append(slot >= 0)
        assert torch.equal(slot, torch.where(held[-1], torch.arange(slot.numel()), -1)) and torch.equal(owner, slot)
    held = torch.cat(held)
    assert 0 < int(held.sum()) < held.numel()  # some rows selected, some never


def test_loads_slot_per_row_pools_numbered_otherwise():
    """A state_dict whose slot-per-row pools number their slots otherwise (earlier versions gave a new row the
    lowest free slot) loads with each row's state moved to its own slot, and continues bit-identically."""
    params = _pool_params(seed=7)
    uninterrupted = _own_slot_run(params, 6)
    sd = copy.deepcopy(uninterrupted.state_dict())
    expected = _own_slot_run(params, 4, gen_seed=9, opt=uninterrupted)
    gen = torch.Generator().manual_seed(0)
    for saved in sd["pools"]:  # scramble: slot s -> perm[s] (the scratch row stays last)
        cap = saved["capacity"]
        perm = torch.randperm(cap, generator=gen)
        held = saved["slot"] >= 0
        saved["slot"][held] = perm[saved["slot"][held]]
        for k in ("owner", "last_used"):
            saved[k][perm] = saved[k].clone()
        for k in ("step", "exp_avg", "exp_avg_sq"):
            saved[k][perm] = saved[k][:cap].clone()
    resumed_params = _pool_params(seed=7)  # the parameters at the save: the first 6 steps again
    _own_slot_run(resumed_params, 6)
    opt = CircuitAdamW(resumed_params, lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(sd)
    for pool in opt._pools.values():
        slot = pool.t["slot"]
        assert torch.equal(slot, torch.where(slot >= 0, torch.arange(slot.numel()), -1))
    _own_slot_run(resumed_params, 4, gen_seed=9, opt=opt)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))
    _assert_same_state(expected.state_dict(), opt.state_dict())


def test_a_fixed_circuit_writes_no_index_entries_and_matches_fresh_selections():
    """Slot-per-row pools: steps on a fixed circuit (its kept row indices, also when the same rows are set again)
    write nothing but the update after the first — the time stamps they owe are written once, before a step on
    another circuit or one that may be skipped (one launch a parameter) — and end with the same parameters and
    state (time stamps included) as the same steps with the circuit set anew and its indices rebuilt every step
    (every entry written each step), through a circuit change, a step skipped on the device (non-finite gradient
    under skip_nonfinite), a checkpoint reload and a state_dict taken between steps of a fixed circuit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.index_copy_.default
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(3)
    circuits = []
    while len(circuits) < 2:
        masks = _random_masks(_pool_params(seed=8), gen)
        if len(masks) >= 2:
            circuits.append(masks)
    runs = []
    for fresh in (False, True):
        params = _pool_params(seed=8)
        opt = CircuitAdamW(params, lr=1e-2, weight_decay=0.1)
        _reserve(opt, params)
        copies = []
        for step in range(9):
            circuit = circuits[step >= 5]
            if fresh or step in (0, 5, 7):
                opt.set_circuit({params[i]: m.clone() for i, m in circuit.items()})
            if fresh:
                opt._indices.clear()
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.skip_nonfinite = step == 2
            if step == 2:  # skipped on the device: the next step writes every entry again
                next(params[i] for i in circuit).grad.view(-1)[0] = float("nan")
            if step == 6:  # reload mid-run: the rebuilt pools know nothing of earlier writes
                sd = copy.deepcopy(opt.state_dict())
                opt = CircuitAdamW(params, lr=1e-2, weight_decay=0.1)
                opt.load_state_dict(sd)
                opt.set_circuit({params[i]: m.clone() for i, m in circuit.items()})
            with Count() as count:
                opt.step()
            copies.append(count.n)
        runs.append((params, opt, copies))
    (params, opt, copies), (fresh_params, fresh_opt, fresh_copies) = runs
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_params))
    _assert_same_state(opt.state_dict(), fresh_opt.state_dict())
    for step in (1, 4, 7, 8):  # a fixed circuit (7: set again, the same rows): no slot, owner or time-stamp write
        assert copies[step] == fresh_copies[step] - 3 * len(circuits[step >= 5]), step
    for step in (2, 5):  # skipped, new circuit: everything, and the stamps the fixed circuit's last step owed
        assert copies[step] == fresh_copies[step] + len(circuits[0]), step
    for step in (0, 3, 6):  # first, after a skip, reloaded: everything
        assert copies[step] == fresh_copies[step], step


@pytest.mark.parametrize("capacity", [None, 0.5], ids=["own-slots", "shared-pool"])
def test_step_layouts_are_reused_only_while_the_gradients_come_alike(capacity):
    """A fixed circuit's steps reuse the layout planned at its first step (``_StepLayout``: no per-parameter
    lookups or validation) until a gradient vanishes, appears or comes compact instead of dense — then the step
    plans afresh. Parameters and state (time stamps included) equal the same steps each planned afresh; a
    compact gradient of the wrong shape is still refused, nothing written."""
    sel = {0: ParamSelection(0, 6, ((1, 3),)), 1: ParamSelection(1, 5, ((0, 2),)),
           2: ParamSelection(0, 7, ((0, 2), (4, 6)))}
    # per step: a parameter without gradient, or given compact (set_grad_rows); planned afresh where it changes
    kinds = ["dense", "dense", "missing", "dense", "compact", "compact", "dense", "dense"]
    runs = []
    for fresh in (False, True):
        params = _pool_params(seed=4)
        opt = CircuitAdamW(params, lr=1e-2, weight_decay=0.1, state_capacity=capacity)
        _reserve(opt, params)
        opt.set_circuit({params[i]: s for i, s in sel.items()})
        plan, planned = opt._plan, []
        opt._plan = lambda gi, group, plan=plan, planned=planned: planned.append(1) or plan(gi, group)
        for step, kind in enumerate(kinds):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            if kind == "missing":
                params[0].grad = None
            if kind == "compact":
                opt.set_grad_rows({params[1]: params[1].grad[:, 0:2].t().contiguous() * 3})
            if fresh:
                opt._layouts = None
            n = len(planned)
            opt.step()
            if not fresh:
                assert (len(planned) > n) == (step == 0 or kind != kinds[step - 1]), step
        runs.append((params, opt))
    (params, opt), (fresh_params, fresh_opt) = runs
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_params))
    _assert_same_state(opt.state_dict(), fresh_opt.state_dict())
    before = [p.detach().clone() for p in params]
    opt.set_grad_rows({params[1]: torch.randn(3, 4)})  # the circuit selects 2 columns
    with pytest.raises(CTFastError, match="compact gradient of shape"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_one_range_selections_read_dense_gradients_without_a_gather():
    """A selection of one range of rows (a head, a block of neurons) takes its dense gradient's rows as a view;
    several ranges gather them (one ``index_select`` a parameter). Same updates either way (the trajectory test
    above checks the values)."""
    from torch.profiler import profile

    params = _pool_params(seed=2)
    opt = CircuitAdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    counts = []
    for ranges in (((1, 3),), ((0, 1), (2, 3))):
        opt.set_circuit({p: ParamSelection(0, p.shape[0], ranges) for p in params})
        with profile() as prof:
            opt.step()
        counts.append(sum(e.name == "aten::index_select" for e in prof.events()))
    assert counts == [0, len(params)]


def test_a_step_refused_by_its_checks_allocates_no_state():
    """Every check of a step runs before any pool is joined or allocated: a GradScaler handing its scale to a
    circuit-tuning optimizer (which refuses non-finite steps itself) is refused with the fix named, and the
    optimizer still holds no state."""
    from ct_fast.testing import random_batch, tiny_model

    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-3, model=model, top_n=10)
    batch = random_batch(37)
    model(**batch).loss.backward()
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.zeros(1)  # what GradScaler.step hands over
    with pytest.raises(CTFastError, match="GradScaler with a circuit-tuning optimizer"):
        opt.step()
    assert opt.state_bytes() == 0
