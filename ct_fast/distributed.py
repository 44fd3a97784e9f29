"""Data-parallel circuit-tuning over ``torch.distributed``: one circuit for all ranks, communication
proportional to it.

Each rank scores edges on its own batch; before selection the scores (and the example and token counts
that normalise them, and the mean-ablation means) are all-reduced, so every rank selects the same circuit
— the one a single process would select on the concatenated global batch. After selection only the compact
gradients of the circuit's rows are all-reduced (averaged, as ``DistributedDataParallel`` averages), in
flat buckets. Per step the ranks first exchange a small fingerprint (step, mode, top_n, whether a backward
ran, a local non-finite loss): a mismatch raises ``CTFastError`` on every rank instead of hanging in a
collective whose partner never comes, and a NaN on one rank refuses the step on all of them.

``DataParallel.of(model)`` picks the process group: a ``DistributedDataParallel`` wrapper's (its own
gradient reduction is switched off while circuit-tuning: tunable weights get no ``.grad``, and ct_fast
reduces the compact gradients instead); an FSDP2 ``fully_shard`` model's mesh (parameters are DTensors
sharded on dim 0: the masked linears and the scorer read the unsharded tensors FSDP2 gathers for each
module's forward and backward — an earlier layer's writer weights are all-gathered for scoring — and the
optimizer updates the selected rows of the local shard, its state sized by the shard); else the default
group when one is initialised with more than one rank; else None (single process).
"""

from __future__ import annotations

import json
import zlib

import torch
import torch.distributed as dist
from torch import nn

from .errors import CTFastError

BUCKET_BYTES = 64 << 20  # compact gradients are all-reduced in flat fp32 buckets of at most this size
STREAM_BUCKET_BYTES = 16 << 20  # ... and while the backward runs, in smaller ones (earlier starts)


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded DTensor is all-gathered (a collective: every rank must call it in the same
    order), anything else returned as is."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard, writes through), or ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shard_rows(p: torch.Tensor) -> tuple[int, int]:
    """``(first, stop)``: the dim-0 rows of ``p`` this rank holds (FSDP2 Shard(0): chunks of ceil(n / world))."""
    if not is_dtensor(p):
        return 0, p.shape[0] if p.dim() else 1
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-n // world)
    return min(n, rank * chunk), min(n, (rank + 1) * chunk)


def _buckets(items: list, numels: list[int], limit: int) -> list[list]:
    """``items`` in order, grouped into consecutive buckets of at most ``limit`` fp32 bytes (one item may exceed
    it alone)."""
    buckets, current, size = [], [], 0
    for item, n in zip(items, numels):
        if current and size + 4 * n > limit:
            buckets.append(current)
            current, size = [], 0
        current.append(item)
        size += 4 * n
    return buckets + [current] if current else buckets


def _crc(value) -> int:
    return zlib.crc32(json.dumps(value, sort_keys=True, default=str).encode()) & 0x7FFFFFFF


class DataParallel:
    """The ranks of one data-parallel circuit-tuning run (see the module docstring).

    ``comm_bytes``: bytes this rank sent into all-reduces during the current step (payload sizes; what the
    algorithm moves on the wire is a small multiple of it, the same for DDP).
    """

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.comm_bytes = 0

    @staticmethod
    def of(model: nn.Module):
        """``(inner module, DistributedDataParallel wrapper or None, process group or None, sharded)`` for
        ``model``; ``sharded``: its parameters are FSDP2 DTensors sharded on dim 0 over the group."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.module, model, model.process_group, False
        sharded = [p for p in model.parameters() if is_dtensor(p)]
        if sharded:
            meshes = {(p.device_mesh.ndim, tuple(p.device_mesh.mesh.flatten().tolist())) for p in sharded}
            placements = {tuple(type(x).__name__ + str(getattr(x, "dim", "")) for x in p.placements) for p in sharded}
            if len(meshes) > 1 or next(iter(meshes))[0] != 1 or placements != {("Shard0",)}:
                raise CTFastError(f"the model's DTensor parameters are placed {sorted(placements)} on {len(meshes)} "
                                  "mesh(es); circuit-tuning supports FSDP2 fully_shard on one 1-D mesh (Shard(0))")
            return model, None, sharded[0].device_mesh.get_group(), True
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return model, None, dist.group.WORLD, False
        return model, None, None, False

    # ---- collectives ----
    def _all_reduce(self, t: torch.Tensor, what: str, op=dist.ReduceOp.SUM):
        self.comm_bytes += t.numel() * t.element_size()
        try:
            dist.all_reduce(t, op=op, group=self.group)
        except RuntimeError as e:
            raise CTFastError(f"{what}: not every rank joined the all-reduce ({e}); all ranks must run the same "
                              "steps with the same model and options") from e

    def reduce_number(self, value, what: str, op=dist.ReduceOp.SUM) -> float:
        """This rank's ``value`` (a host number) reduced over the ranks with ``op``, read back on the host: one small
        all-reduce and its read (fp64: exact for counts up to 2^53)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._all_reduce(t, what, op=op)
        return float(t)

    AGREE_WIDTH = 16  # longs per rank in every ``agree``: one size at every call point, so ranks that reach different
    # points (e.g. one streams gradients while another concludes its step) exchange and see that, and raise

    def agree(self, what: str, fields: dict, free=()) -> dict:
        """Raise ``CTFastError`` on every rank unless all ranks hold equal ``fields`` (ints or plain data) at the
        same call point ``what``; the ``free`` ones may differ. Returns ``{field: [value per rank]}`` (plain data
        as checksums)."""
        keys = sorted(fields)
        if len(keys) >= self.AGREE_WIDTH:
            raise AssertionError(f"agree({what!r}) takes at most {self.AGREE_WIDTH - 1} fields")
        values = [_crc(what)] + [v if isinstance(v, int) else _crc(v) for v in (fields[k] for k in keys)]
        mine = torch.tensor(values + [0] * (self.AGREE_WIDTH - len(values)), dtype=torch.long, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        self.comm_bytes += mine.numel() * mine.element_size()
        try:
            dist.all_gather(gathered, mine, group=self.group)
        except RuntimeError as e:
            raise CTFastError(f"{what}: not every rank joined ({e}); all ranks must run the same steps") from e
        table = torch.stack(gathered).cpu()
        elsewhere = [r for r in range(self.world) if int(table[r, 0]) != int(table[self.rank, 0])]
        if elsewhere:
            raise CTFastError(f"{what}: rank(s) {elsewhere} reached another point of the step than rank "
                              f"{self.rank} (e.g. 'auto' memory mode chose another mode there, or a different "
                              "sequence of forward/backward/step calls); every rank must circuit-tune the same "
                              "model with the same options and call backward/step in step")
        table = table[:, 1:]
        bad = [k for i, k in enumerate(keys) if k not in free and not bool((table[:, i] == table[0, i]).all())]
        if bad:
            detail = ", ".join(f"{k} = {table[:, keys.index(k)].tolist()}" for k in bad)
            raise CTFastError(f"{what}: the ranks disagree on {detail} (rank order); every rank must circuit-tune "
                              "the same model with the same options and call backward/step in step")
        return {k: table[:, i].tolist() for i, k in enumerate(keys)}

    def broadcast_parameters(self, model: nn.Module):
        """Rank 0's parameters and buffers on every rank (what ``DistributedDataParallel`` does when it wraps)."""
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=dist.get_global_rank(self.group, 0), group=self.group)

    def reduce_scores(self, raw: torch.Tensor, batch_size: int, means: list | None):
        """All-reduce one rank's attribution: ``(raw [n_up, n_down] of the global batch, global example count)``.

        ``means``: the mean-ablation entries ``[node means [n_up, d], tokens, factor, grad_sum [n_down, d]]``
        of this rank's micro-batches (None for other ablations); each is re-centred on the global mean first."""
        if means:
            n = sum(m[1] for m in means)
            head = torch.cat([sum(m[0] * m[1] for m in means).flatten().float(),
                              torch.tensor([n, batch_size], dtype=torch.float32, device=raw.device)])
            self._all_reduce(head, "edge-score normalisation")
            global_mean = head[:-2].view_as(means[0][0]) / head[-2]
            batch_size = int(head[-1])
            raw = raw.clone()
            for node_means, _, factor, grad_sum in means:
                raw += factor * (node_means - global_mean) @ grad_sum.t()
            self._all_reduce(raw, "edge scores")
        else:
            shape = raw.shape
            raw = torch.cat([raw.flatten(), torch.tensor([batch_size], dtype=raw.dtype, device=raw.device)])
            self._all_reduce(raw, "edge scores")
            batch_size, raw = int(raw[-1]), raw[:-1].view(shape)
        return raw / self.world, batch_size  # each rank's metric is its own mean: the global one is their mean

    def stream(self, sizes: dict) -> "GradStream":
        """A ``GradStream`` for compact gradients of ``sizes`` ``{param: numel}`` (in the order the backward
        should finish them: last layers first)."""
        return GradStream(self, sizes)

    def reduce_grads(self, grads: dict):
        """Average the compact gradients ``{param: [k, ...]}`` over the ranks, in place, in flat buckets; every rank
        passes the same parameters in the same order (the buckets are matched by position)."""
        tensors = list(grads.values())
        for bucket in _buckets(tensors, [t.numel() for t in tensors], BUCKET_BYTES):
            flat = torch.cat([t.reshape(-1).float() for t in bucket])
            self._all_reduce(flat, "circuit gradients")
            flat /= self.world
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


class GradStream:
    """Average compact gradients over the ranks while the backward runs (as ``DistributedDataParallel`` overlaps
    its all-reduce with the backward).

    The buckets are fixed up front from the selection (the same on every rank): bucket ``i`` is launched as an
    asynchronous all-reduce once all its parameters' gradients are final (``ready``) and every earlier bucket is
    launched, so every rank issues the same collectives in the same order. ``finish`` launches what is left
    (a gradient a rank never produced counts as zeros there; ``missing`` — the number of such gradients over all
    ranks, a 0-d tensor carried by the last bucket — lets the caller refuse the step on every rank), waits, and
    writes the averages into ``grads``.
    ``early_bytes``: bytes launched before ``finish`` (overlapped with the backward)."""

    def __init__(self, dp: DataParallel, sizes: dict):
        self.dp, self.sizes = dp, sizes
        self.buckets = _buckets(list(sizes), list(sizes.values()), STREAM_BUCKET_BYTES)
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.waiting = [{id(p) for p in b} for b in self.buckets]
        self.launched: list = []  # (work, flat, bucket)
        self.early_bytes = 0
        self.missing = None

    def ready(self, p: torch.Tensor, grads: dict):
        """``grads[p]`` is final on this rank: launch every bucket that is now complete, in order."""
        i = self.bucket_of.get(id(p))
        if i is not None:
            self.waiting[i].discard(id(p))
            self._launch(grads, early=True)

    def _launch(self, grads: dict, early: bool):
        while len(self.launched) < len(self.buckets) and (not early or not self.waiting[len(self.launched)]):
            bucket = self.buckets[len(self.launched)]
            parts = [grads[p].reshape(-1).float() if p in grads else
                     torch.zeros(self.sizes[p], dtype=torch.float32, device=self.dp.device) for p in bucket]
            if len(self.launched) == len(self.buckets) - 1:  # the last bucket carries this rank's missing count
                missing = sum(p not in grads for p in self.sizes)
                parts.append(torch.full((1,), float(missing), dtype=torch.float32, device=self.dp.device))
            flat = torch.cat(parts)
            self.dp.comm_bytes += flat.numel() * 4
            self.early_bytes += flat.numel() * 4 if early else 0
            try:
                work = dist.all_reduce(flat, group=self.dp.group, async_op=True)
            except RuntimeError as e:
                raise CTFastError(f"circuit gradients: not every rank joined the all-reduce ({e}); all ranks must "
                                  "run the same steps with the same model and options") from e
            self.launched.append((work, flat, bucket))

    def finish(self, grads: dict) -> dict:
        """Launch the buckets left, wait for all, and return ``{param: averaged compact gradient}`` (the
        tensors of ``grads``, updated in place, in bucket order)."""
        self._launch(grads, early=False)
        out = {}
        for work, flat, bucket in self.launched:
            try:
                work.wait()
            except RuntimeError as e:
                raise CTFastError(f"circuit gradients: the all-reduce failed ({e}); all ranks must run the same "
                                  "steps with the same model and options") from e
            if bucket is self.buckets[-1]:
                self.missing = flat[-1].clone()
            flat /= self.dp.world
            offset = 0
            for p in bucket:
                n = self.sizes[p]
                if p in grads:
                    grads[p].copy_(flat[offset:offset + n].view_as(grads[p]))
                    out[p] = grads[p]
                offset += n
        self.launched = []
        return out
