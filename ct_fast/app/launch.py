"""The processes of one command-line run: a single process, or the ranks of
``torchrun --nproc-per-node N -m ct_fast tune ...``.

Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment) every rank reads the data and
loads the model; each step's global batch — the same ``--batch-size`` example indices on every rank — is cut
into contiguous slices, one per rank. The model is wrapped in ``DistributedDataParallel`` (``--parallel ddp``,
parameters and optimizer state replicated) or sharded with FSDP2 ``fully_shard`` (``--parallel fsdp``: every
decoder layer and the root; parameters and optimizer state split across ranks). Circuit-tuning selects one
circuit for all ranks and all-reduces only its compact gradients (``ct_fast.distributed``). Rank 0 alone writes
the run directory, the log, circuits, pictures and the tuned model; a checkpoint is written by rank 0
(replicated state) or by every rank (its shard; the model through ``torch.distributed.checkpoint``).

Circuit-tuning (``CircuitTuner``) weighs each rank's loss by its share of all the ranks' label tokens and averages
the ranks' gradients: a step equals one process on the global batch whatever the ranks' token counts. Full and LoRA
fine-tuning take each rank's per-token mean and average them, as ``DistributedDataParallel`` does: equal to one
process when the ranks hold equal label tokens.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CTFastError

PARALLEL = ("ddp", "fsdp")
TIMEOUT = datetime.timedelta(minutes=10)  # a rank that never joins a collective fails the run after this long


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "LOCAL_RANK" in os.environ


class Launch:
    """Rank, world size and the collectives the command line needs. ``Launch()`` is a single process;
    ``Launch.start(device)`` joins the ``torchrun`` process group (or uses one already initialised)."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0, parallel: str | None = None,
                 owns_group: bool = False):
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.parallel, self.owns_group = parallel, owns_group
        self.comm_device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 (or the only process): the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.parallel is not None

    @classmethod
    def start(cls, device: str | None, parallel: str = "ddp") -> "Launch":
        """The launch of this process: single unless started by ``torchrun`` (then with ``parallel``: ``ddp``
        or ``fsdp``; the NCCL backend on CUDA, gloo on CPU). A world of one under ``torchrun`` still runs
        the distributed code paths (one process group of one rank)."""
        if parallel not in PARALLEL:
            raise CTFastError(f"--parallel {parallel!r} is not one of {PARALLEL}")
        if dist.is_available() and dist.is_initialized():
            launch = cls(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), parallel)
        elif under_torchrun():
            if not dist.is_available():
                raise CTFastError("torchrun started this process, but this torch build has no torch.distributed")
            local_rank = int(os.environ["LOCAL_RANK"])
            if device is not None and str(device).startswith("cuda:"):
                raise CTFastError(f"--device {device} names one GPU for every process; under torchrun pass --device "
                                  "cuda (each rank takes cuda:LOCAL_RANK)")
            cuda = device is not None and str(device).startswith("cuda")
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
            launch = cls(dist.get_world_size(), dist.get_rank(), local_rank, parallel, owns_group=True)
        else:
            return cls()
        if device is not None and str(device).startswith("cuda"):
            launch.comm_device = torch.device("cuda", torch.cuda.current_device())
        return launch

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, requested: str | None) -> str | None:
        """The device this rank loads the model on: ``cuda`` becomes ``cuda:LOCAL_RANK`` under ``torchrun``."""
        if self.distributed and requested == "cuda":
            return f"cuda:{self.local_rank}"
        return requested

    # ---- collectives (each a no-op in a single process; every rank calls them in the same order) ----
    def on_main(self, fn):
        """``fn()`` on rank 0, its result on every rank; a ``CTFastError`` it raises is raised on every rank."""
        if not self.distributed:
            return fn()
        box = [None, None]
        if self.main:
            try:
                box[0] = fn()
            except CTFastError as e:
                box[1] = str(e)
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise CTFastError(box[1])
        return box[0]

    def gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a small tensor (float64; one all-reduce)."""
        values = values.detach().to(self.comm_device, torch.float64)
        if self.distributed:
            dist.all_reduce(values)
            values /= self.world
        return values

    def barrier(self):
        if self.distributed:
            dist.barrier()

    # ---- data and model ----
    def check_batch_size(self, batch_size: int):
        if batch_size % self.world:
            raise CTFastError(f"--batch-size {batch_size} does not split over {self.world} processes; choose a "
                              f"multiple of {self.world} (the global batch is cut into one equal slice per rank)")

    def split(self, indices: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch's example indices."""
        self.check_batch_size(len(indices))
        per = len(indices) // self.world
        return indices[self.rank * per:(self.rank + 1) * per]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model the steps run: ``model`` itself (single process), its ``DistributedDataParallel`` wrapper, or
        ``model`` sharded in place with FSDP2 (every decoder layer, then the root)."""
        if not self.distributed:
            return model
        if self.parallel == "ddp":
            device = next(model.parameters()).device
            ids = [device.index] if device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        return fully_shard(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a supported causal LM (``model.model.layers`` or GPT-2's ``transformer.h``)."""
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(inner, "layers", None) or getattr(inner, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise CTFastError(f"--parallel fsdp: no decoder layers found in {type(model).__name__} (a plain "
                          "transformers *ForCausalLM is expected; LoRA runs use --parallel ddp)")
    return layers
