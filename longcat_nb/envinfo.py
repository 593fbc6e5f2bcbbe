"""What the machine offers: torch, CUDA, GPU, VRAM, RAM, package versions."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import threading

import torch

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "triton", "xformers",
            "bitsandbytes", "optimum-quanto", "torchao", "av", "papermill", "ipywidgets", "jupyterlab")


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def host_ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


GPU_CAP_ENV = "LONGCAT_NB_GPU_MEMORY_GIB"


def gpu_memory_cap() -> float | None:
    """LONGCAT_NB_GPU_MEMORY_GIB as a number of GiB, or None when unset."""
    text = os.environ.get(GPU_CAP_ENV, "").strip()
    if not text:
        return None
    try:
        cap = float(text)
    except ValueError:
        cap = -1.0
    if cap <= 0:
        raise ValueError(f"{GPU_CAP_ENV}={text!r}: give the GiB this process may use on the GPU, e.g. 24, or unset it")
    return cap


def apply_gpu_memory_cap(device: int = 0) -> float | None:
    """Hold this process's CUDA allocations under LONGCAT_NB_GPU_MEMORY_GIB (torch's
    set_per_process_memory_fraction), so a large GPU runs what a smaller card runs; the kit's
    planner decisions then use the cap as the card's size (gpu_memory_gib). Returns the cap."""
    cap = gpu_memory_cap()
    if cap is None or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    return min(cap, total)


def configure_allocator(log=None) -> bool:
    """Expandable segments for torch's CUDA caching allocator, unless PYTORCH_CUDA_ALLOC_CONF (or the
    newer PYTORCH_ALLOC_CONF) says otherwise: without them, blocks of many sizes (a bucket shape each,
    block swap's copies) leave memory reserved that no later request fits (80 GiB training run 21:
    99 GiB reserved for 65 GiB allocated), and a capped or small card runs out with room to spare.
    Takes effect for the allocations after it, so it may run after CUDA started. True when set now."""
    if {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(os.environ) or not torch.cuda.is_available():
        return False
    if getattr(configure_allocator, "done", False):
        return False
    try:
        _allocator_setter()("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # an older torch or a backend without them
        if log is not None:
            log(f"CUDA allocator: expandable segments not set ({e})")
        return False
    configure_allocator.done = True
    return True


def _allocator_setter():
    """torch's setter of allocator options: torch.cuda's (deprecated since 2.11, with a FutureWarning
    every call) only forwards to the accelerator-wide one that newer torch has."""
    return getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings


def gpu_memory_peaks(device) -> str:
    """This process's peak allocated and reserved GPU memory, for an out-of-memory message."""
    if torch.device(device).type != "cuda":
        return "not on a CUDA device"
    return (f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB reserved")


def step_memory(device) -> dict:
    """A training step record's memory figures on CUDA: the peak allocated (``mem_gib``), the peak the
    allocator reserved, how often it had to free its cache and retry (the count grows when the
    card is full), and the host memory this process holds now (pinned buffers included)."""
    stats = torch.cuda.memory_stats(device)
    out = {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
           "reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
           "alloc_retries": int(stats.get("num_alloc_retries", 0))}
    rss = proc_status_gib("VmRSS")
    if rss is not None:
        out["host_rss_gib"] = rss
    return out


def proc_status_gib(key: str):
    """A memory line of /proc/self/status (``VmRSS`` now, ``VmHWM`` the peak) in GiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


class RssPeaks:
    """Peaks of this process's anonymous memory (RssAnon: its own, page-locked included) and of the
    file pages it maps (RssFile: model files read through a mapping, which the kernel may drop and read
    again) while the ``with`` block runs, polled from /proc/self/status every ``every`` seconds;
    ``gib()`` gives them (empty off Linux). VmHWM, the one peak the kernel keeps, adds the two."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak = every, {}
        self._stop = threading.Event()
        self._thread = None

    def _poll(self) -> None:
        while True:
            for key in ("RssAnon", "RssFile"):
                v = proc_status_gib(key)
                if v is not None:
                    self.peak[key] = max(self.peak.get(key, 0.0), v)
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        if proc_status_gib("RssAnon") is not None:
            self._thread = threading.Thread(target=self._poll, name="rss-peaks", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def gib(self) -> dict:
        return {f"host_{'anon' if k == 'RssAnon' else 'file'}_peak_gib": v for k, v in self.peak.items()}


def gpu_memory_gib(device=0) -> float:
    """The GPU's memory in GiB, or the cap of LONGCAT_NB_GPU_MEMORY_GIB when smaller."""
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    cap = gpu_memory_cap()
    return total if cap is None else min(total, cap)


def environment_report() -> dict:
    rep = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ram_gib": round(host_ram_gib(), 1),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "gpus": [],
        "packages": {p: _version(p) for p in PACKAGES},
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rep["gpus"].append({
                "index": i, "name": p.name, "vram_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported(),
            })
    return rep


def report_rows(rep: dict) -> list[dict]:
    rows = [{"item": k, "value": v} for k, v in rep.items() if k not in ("gpus", "packages")]
    rows += [{"item": f"GPU {g['index']}", "value": f"{g['name']}, {g['vram_gib']} GiB, sm {g['capability']}"}
             for g in rep["gpus"]]
    rows += [{"item": p, "value": v} for p, v in rep["packages"].items()]
    return rows
