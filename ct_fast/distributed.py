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
reduces the compact gradients instead), else the default group when one is initialised with more than one
rank, else None (single process).
"""

from __future__ import annotations

import json
import zlib

import torch
import torch.distributed as dist
from torch import nn

from .errors import CTFastError

BUCKET_BYTES = 64 << 20  # compact gradients are all-reduced in flat fp32 buckets of at most this size


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
        """``(inner module, DistributedDataParallel wrapper or None, process group or None)`` for ``model``."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.module, model, model.process_group
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise CTFastError("the model's parameters are DTensors (FSDP2 fully_shard / tensor parallel): sharded "
                              "circuit-tuning is not supported yet — wrap the model in DistributedDataParallel")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return model, None, dist.group.WORLD
        return model, None, None

    # ---- collectives ----
    def _all_reduce(self, t: torch.Tensor, what: str, op=dist.ReduceOp.SUM):
        self.comm_bytes += t.numel() * t.element_size()
        try:
            dist.all_reduce(t, op=op, group=self.group)
        except RuntimeError as e:
            raise CTFastError(f"{what}: not every rank joined the all-reduce ({e}); all ranks must run the same "
                              "steps with the same model and options") from e

    def agree(self, what: str, fields: dict, free=()) -> dict:
        """Raise ``CTFastError`` on every rank unless all ranks hold equal ``fields`` (ints or plain data); the
        ``free`` ones may differ. Returns ``{field: [value per rank]}`` (plain data as checksums)."""
        keys = sorted(fields)
        mine = torch.tensor([v if isinstance(v, int) else _crc(v) for v in (fields[k] for k in keys)],
                            dtype=torch.long, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        self.comm_bytes += mine.numel() * mine.element_size()
        try:
            dist.all_gather(gathered, mine, group=self.group)
        except RuntimeError as e:
            raise CTFastError(f"{what}: not every rank joined ({e}); all ranks must run the same steps") from e
        table = torch.stack(gathered).cpu()
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

    def reduce_grads(self, grads: dict):
        """Average the compact gradients ``{param: [k, ...]}`` over the ranks, in place, in flat buckets."""
        tensors = list(grads.values())
        buckets, current, size = [], [], 0
        for t in tensors:
            if current and size + t.numel() * 4 > BUCKET_BYTES:
                buckets.append(current)
                current, size = [], 0
            current.append(t)
            size += t.numel() * 4
        if current:
            buckets.append(current)
        for bucket in buckets:
            flat = torch.cat([t.reshape(-1).float() for t in bucket])
            self._all_reduce(flat, "circuit gradients")
            flat /= self.world
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
