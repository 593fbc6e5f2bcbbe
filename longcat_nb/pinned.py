"""Page-locked host memory of the exact size asked for.

torch's ``pin_memory()`` and ``empty(..., pin_memory=True)`` go through its caching host allocator,
which rounds every allocation up to a power of two and keeps freed blocks for reuse. For the
block inputs that activation offload keeps on the host (one [N, 4096] bf16 tensor per block,
0.29 GiB at 480x832x93) that is 0.5 GiB each: 24 GiB for 48 blocks instead of 13.7, and with
block swap's weights beside it a 24 GiB card's run needed 33 GiB of host RAM (docs/benchmarks.md,
run 26). Here a plain CPU allocation is registered with the driver (cudaHostRegister), so it is
page-locked at its own size, and it is unregistered when its owner goes.

* :class:`Slab`: one registered buffer; ``view(offset, shape, dtype)`` carves tensors out of it.
* :func:`pack`: many tensors copied into one slab (block swap keeps each swapped block in one).
* :class:`HostPool`: reusable slabs for the offloaded block inputs of each training step.

Off CUDA (or where registration fails) a slab is ordinary memory: everything works, unpinned.
"""
from __future__ import annotations

import logging
import threading
import weakref
from typing import Iterable, Optional

import torch

logger = logging.getLogger(__name__)

ALIGN = 512  # bytes: every tensor carved out of a slab starts on this boundary
_warned = False


def _cudart():
    try:
        if torch.cuda.is_available():
            return torch.cuda.cudart()
    except Exception:  # noqa: BLE001 - a build without the runtime bindings: stay unpinned
        pass
    return None


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Slab:
    """``nbytes`` of host memory, page-locked when ``pin`` and CUDA can register it.

    The memory is freed when the slab and every tensor carved from it are gone; the registration
    ends with the slab (a tensor that outlives it stays valid, in pageable memory)."""

    def __init__(self, nbytes: int, pin: bool = True):
        global _warned
        self.nbytes = int(nbytes)
        self.data = torch.empty(max(self.nbytes, 1), dtype=torch.uint8)
        self.pinned = False
        rt = _cudart() if pin else None
        if rt is not None and self.nbytes:
            err = rt.cudaHostRegister(self.data.data_ptr(), self.nbytes, 0)
            self.pinned = int(getattr(err, "value", err)) == 0
            if not self.pinned and not _warned:
                _warned = True
                logger.warning("could not page-lock %.2f GiB of host memory (cudaHostRegister: %s); host "
                               "copies stay in pageable memory and are slower", self.nbytes / 2**30, err)
            if self.pinned:
                weakref.finalize(self, _unregister, rt, self.data.data_ptr())

    def view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        size = torch.Size(shape)
        nbytes = size.numel() * dtype.itemsize
        if offset % ALIGN or offset + nbytes > self.nbytes:
            raise ValueError(f"slab of {self.nbytes} bytes: no room for {nbytes} at offset {offset}")
        return self.data[offset: offset + nbytes].view(dtype).view(size)


def _unregister(rt, ptr: int) -> None:
    try:
        rt.cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at interpreter exit the runtime may be gone already
        pass


def pack(tensors: Iterable[torch.Tensor], pin: bool = True) -> tuple[Optional[Slab], list[torch.Tensor]]:
    """Host copies of ``tensors`` (any device), all in one slab: (the slab, the copies in order).
    Each copy has its tensor's shape and dtype and is contiguous."""
    tensors = list(tensors)
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += _align(t.numel() * t.element_size())
    if not tensors:
        return None, []
    slab = Slab(total, pin=pin)
    out = []
    with torch.no_grad():
        for t, off in zip(tensors, offsets):
            host = slab.view(off, t.shape, t.dtype)
            host.copy_(t.detach())
            out.append(host)
    return slab, out


class HostPool:
    """Page-locked buffers for tensors that leave the GPU for a while and come back (the block
    inputs of activation offload), reused from one training step to the next.

    ``take(shape, dtype)`` gives a host tensor, from the smallest free slab that holds it or a new
    one of the exact size; the slab is free again once that tensor is gone (the backward dropped
    it, or the graph was discarded). A new larger shape (another bucket) retires the free slabs
    that it supersedes (at least half its size), so the pool follows the largest shape in use
    rather than adding one set of slabs per shape. GPU copies into a slab wait for the last
    copy out of it (an event recorded when it came back), so reuse needs no host synchronization."""

    def __init__(self, pin: bool = True):
        self.pin = pin
        self.free: list[tuple[Slab, object]] = []  # (slab, event recorded when it was given back)
        self.in_use = 0
        self.lock = threading.Lock()  # backward may run on autograd's device thread

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s, _ in self.free) + self.in_use

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        need = torch.Size(shape).numel() * dtype.itemsize
        with self.lock:
            fits = [k for k, (s, _) in enumerate(self.free) if s.nbytes >= need]
            if fits:
                slab, ev = self.free.pop(min(fits, key=lambda k: self.free[k][0].nbytes))
            else:
                self.free = [(s, e) for s, e in self.free if not (need // 2 <= s.nbytes < need)]
                slab, ev = Slab(need, pin=self.pin), None
            self.in_use += slab.nbytes
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)
        t = slab.view(0, shape, dtype)
        weakref.finalize(t, self._give_back, slab).atexit = False  # not at exit: nothing to reuse then
        return t

    def _give_back(self, slab: Slab) -> None:
        ev = None
        if slab.pinned and torch.cuda.is_available() and torch.cuda.is_initialized():
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream())
        with self.lock:
            self.in_use -= slab.nbytes
            self.free.append((slab, ev))

    def clear(self) -> None:
        """Drop the free slabs (their memory goes back once nothing uses it)."""
        with self.lock:
            self.free.clear()
