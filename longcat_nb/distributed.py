"""Several GPUs (or CPU processes) under ``torchrun``: PyTorch's own FSDP2 shards the frozen base.

What is sharded and what is not:

* The frozen DiT weights (bf16/fp16/fp32 base) are sharded with ``fully_shard`` per block and at the
  root, so each of N GPUs holds 1/N of the 27 GB and all-gathers one block at a time.
* The LoRA parameters stay whole on every rank (``ignored_params``): they are ~1% of the model, so
  replicating them and their optimizer state costs little and keeps checkpoints plain tensors that
  resume on any number of GPUs. Their gradients are averaged with one all-reduce per optimizer step,
  which makes N GPUs x batch B the same update as one GPU with B x N samples (grad accumulation).
* Quantized bases (int8/int4/fp8/nf4) are tensor subclasses FSDP cannot split; each rank holds the
  whole quantized base (13.6B in int8 is ~14 GB) and only the data is split.

Data: the trainer's micro-batch order (bucket-pure batches, seeded by epoch) does not depend on the
number of processes; rank r of N takes micro-batches ``p + r`` for the shared position ``p``, and
``p`` advances by N. A checkpoint therefore resumes on a different number of GPUs at exactly the next
unseen micro-batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None
    mesh: object = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if self.device is not None and self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def mean(self, value: float) -> float:
        """The average of a float over all ranks."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather_floats(self, value: float) -> list[float]:
        """One float from every rank, in rank order (e.g. each GPU's peak memory)."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        t = torch.zeros(self.world, dtype=torch.float64, device=self._comm_device())
        t[self.rank] = value
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_preference: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment; a no-op for one process.

    GPUs use NCCL with one GPU per process (LOCAL_RANK); the CPU (tests, CI) uses gloo."""
    if not launched_by_torchrun():
        return Dist()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device_preference not in ("cpu",)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                               f"launch with --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    mesh = init_device_mesh(device.type, (world,))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, mesh=mesh)


def shard_frozen_base(model: nn.Module, d: Dist, trainable: list[nn.Parameter], quantized: bool) -> nn.Module:
    """FSDP2 over the frozen base: one shard group per block plus the root (embedders, final layer).
    The trainable LoRA parameters are left out of the groups. A quantized base is left whole."""
    if not d.enabled or quantized:
        return model
    import warnings

    from torch.distributed.fsdp import fully_shard

    # A block returns a view of a fresh tensor and nothing writes to it in place afterwards (the DiT
    # has no in-place ops on the residual stream), so FSDP's warning about views does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    keep = set(trainable)
    for block in model.blocks:
        # the last block's weights are needed again first in backward: keep them gathered
        fully_shard(block, mesh=d.mesh, ignored_params=keep,
                    reshard_after_forward=block is not model.blocks[-1])
    fully_shard(model, mesh=d.mesh, ignored_params=keep, reshard_after_forward=False)
    return model


def sync_lora(params: list[nn.Parameter], d: Dist) -> None:
    """Start every rank from rank 0's LoRA initialisation (seeded alike, but make it a fact)."""
    if not d.enabled:
        return
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def average_gradients(params: list[nn.Parameter], d: Dist) -> None:
    """Mean of the LoRA gradients over ranks, in one flat all-reduce."""
    if not d.enabled:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
