"""Loading the sampling components with the memory options (precision, block swap, compile), placing
each model on the device while it runs (offload='model'), and the VRAM plan of a sampling setting."""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from ..config import OFFLOAD
from ..vae import set_tiling
from .request import SampleError, input_size, request_from_values, sample_size


# ---------------------------------------------------------------------------------------------
# devices and memory
# ---------------------------------------------------------------------------------------------
def _param_device(module) -> torch.device:
    return next(module.parameters()).device


def dit_dtype(dit) -> torch.dtype:
    """Compute dtype of the DiT (its patch embedding is never quantized or LoRA-wrapped)."""
    return dit.x_embedder.proj.weight.dtype


def _exec_device(dit, offload: str, device) -> torch.device:
    if offload not in OFFLOAD:
        raise SampleError(f"offload={offload!r}: use 'none' (models stay where they are) or 'model' "
                          "(each model on the GPU only while it runs)")
    home = _param_device(dit)
    if offload == "none":
        d = torch.device(device) if device is not None else home
        if d.type != home.type or (d.index is not None and d.index != home.index):
            raise SampleError(f"device={device!r} but the DiT is on {home}: move it there first, "
                              "or use offload='model'")
        return home
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else home


@contextlib.contextmanager
def placed(module, device: torch.device, enabled: bool = True):
    """Move ``module`` to ``device`` for the block and back to where it was (offload='model').
    A block-swapped DiT moves only its resident part: the swapped blocks' weights stay in CPU
    memory and stream in block by block, as without the offload."""
    if not enabled or module is None or _param_device(module) == device:
        yield module
        return
    from ..memory import block_swap_of

    swap = block_swap_of(module)
    move = swap.move_resident if swap is not None else module.to
    home = _param_device(module)
    move(device)
    try:
        yield module
    finally:
        move(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def vae_tiling(vae, enabled: Optional[bool]):
    """Tiled VAE decode/encode for the block (None leaves the VAE as it is)."""
    if enabled is None:
        yield
        return
    before = bool(getattr(vae, "use_tiling", False))
    set_tiling(vae, enabled)
    try:
        yield
    finally:
        set_tiling(vae, before)



def _memory(components) -> dict:
    """How the DiT was loaded (precision, blocks_to_swap), for the settings record."""
    from ..memory import block_swap_of

    mem = dict(getattr(components, "memory", None) or {})
    swap = block_swap_of(components.dit) if components.dit is not None else None
    mem.setdefault("blocks_to_swap", len(swap.swapped) if swap is not None else 0)
    return mem


# ---------------------------------------------------------------------------------------------
# loading with the memory options
# ---------------------------------------------------------------------------------------------
_DTYPE_PRECISION = {"auto": "auto", "": "auto", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
                    "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}  # model_files._DTYPES' names


def base_precision(precision: str, dit_dtype: str = "auto") -> str:
    """memory.PRECISIONS value for the sampling DiT: 'auto' follows the model's ``dit_dtype``."""
    from ..memory import PRECISIONS

    if precision not in PRECISIONS:
        raise SampleError(f"precision={precision!r}: choose one of {PRECISIONS} (int8 fits the DiT in 13 GiB)")
    if precision != "auto":
        return precision
    try:
        return _DTYPE_PRECISION[str(dit_dtype).lower()]
    except KeyError:
        raise SampleError(f"model dit_dtype={dit_dtype!r}: use auto, bfloat16, float16 or float32") from None


def load_sampling_components(model, offload: str = "none", precision: str = "auto", blocks_to_swap: int = 0,
                             compile="auto"):
    """Components for sampling from the run's ``model`` settings (config.ModelSettings).

    offload='model': every part is loaded on the CPU in the dtype it will run in on the accelerator
    (bf16 for 'auto', not the CPU's float32), and ``generate(..., offload='model')`` moves each to
    the GPU only while it runs. ``precision`` (memory.PRECISIONS; 'auto' = the model's dit_dtype)
    and ``blocks_to_swap`` are applied to the DiT in training's order (prepare.prepare_for_sampling):
    quantized block by block on the GPU, then the last N blocks' weights
    to pinned CPU memory. LoRAs (yours, cfg_step_lora, refinement_lora) are applied per call on
    top of the quantized weights and stream in with their swapped block. ``compile`` (auto | on |
    off, speed.compile_wanted) compiles each DiT block on CUDA: the first call compiles."""
    from ..envinfo import configure_allocator
    from ..model_files import PARTS, load_components, load_dit, pick_device, pick_dtype
    from ..memory import QUANTIZED, compute_dtype, quantize_block
    from ..prepare import prepare_for_sampling

    if offload not in OFFLOAD:
        raise SampleError(f"offload={offload!r}: use 'none' or 'model'")
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, (int, np.integer)) or blocks_to_swap < 0:
        raise SampleError(f"blocks_to_swap={blocks_to_swap!r}: use a whole number from 0 (none) to 48 (24 fits "
                          "bf16 sampling in 24 GiB)")
    prec = base_precision(precision, model.dit_dtype)
    dev = pick_device(model.device)
    configure_allocator()
    dtypes = {"dit": model.dit_dtype, "vae": model.vae_dtype, "text_encoder": model.text_encoder_dtype}
    home, parts, on_demand = dev, list(PARTS), None
    if offload == "model":  # the text encoder is read from disk onto the GPU for each encoding, then freed
        dtypes = {k: pick_dtype(v, dev) for k, v in dtypes.items()}
        home, parts, on_demand = torch.device("cpu"), [p for p in PARTS if p != "text_encoder"], dtypes["text_encoder"]
    if prec not in QUANTIZED and not blocks_to_swap:  # the plain path: the DiT loads where it runs
        if precision != "auto":
            dtypes["dit"] = compute_dtype(prec, dev)
        comps = load_components(model.checkpoint, parts, device=str(home), dtypes=dtypes, attention=model.attention)
        comps.memory = prepare_for_sampling(comps.dit, prec, 0, dev, home, compile, placed=True)
        comps.text_encoder_on_demand = on_demand
        return comps
    comps = load_components(model.checkpoint, parts=[p for p in parts if p != "dit"], device=str(home), dtypes=dtypes)
    comps.text_encoder_on_demand = on_demand
    if prec in QUANTIZED and dev.type == "cuda" and not blocks_to_swap:  # quantized as it loads onto the GPU
        comps.dit = load_dit(model.checkpoint, dev, compute_dtype(prec, dev), model.attention,
                             each_block=lambda block: quantize_block(block, prec, dev, backward=False))
    else:  # on the host, for block swap: block by block into memory of its own, the files unmapped (run 27)
        comps.dit = load_dit(model.checkpoint, "cpu", compute_dtype(prec, dev), model.attention,
                             each_block=(lambda block: None) if dev.type == "cuda" else None)
    try:
        comps.memory = prepare_for_sampling(comps.dit, prec, int(blocks_to_swap), dev, home, compile)
    except ImportError as e:
        raise SampleError(f"precision={precision!r}: {e}") from None
    return comps


# ---------------------------------------------------------------------------------------------
# the VRAM plan
# ---------------------------------------------------------------------------------------------
def sampling_plan(values: dict, uploaded_image=None, gpu_gib="auto") -> dict:
    """planner.report for the full-size DiT with the 04_sample settings (precision, blocks_to_swap,
    size, frames, CFG or not), plus the text encoder, which training never loads: with offload='none'
    the UMT5-XXL encoder is on the GPU with the DiT's resident weights until the prompts are encoded,
    and in host memory after that; with offload='model' each encoding reads it from disk onto the GPU
    alone and frees it, so it never counts in host memory.
    ``summary`` is the line 04 prints; ``fits``/``advice`` as in planner.report."""
    from ..envinfo import gpu_memory_gib
    from ..planner import GIB, plan, report, sampling_plan_settings, text_encoder_bytes
    from ..speed import compile_choice

    req = request_from_values(values, uploaded_image).resolved()
    h, w = sample_size(req, input_size(req))
    if gpu_gib == "auto":
        gpu_gib = gpu_memory_gib(0) if torch.cuda.is_available() else None
    s = sampling_plan_settings(h, w, req.num_frames, guided=req.guidance > 1,
                               precision=base_precision(values.get("precision", "auto")),
                               blocks_to_swap=values.get("blocks_to_swap", 0),
                               compile=compile_choice(values.get("compile", "auto")) != "off")  # a plan is for a CUDA GPU
    prec, swap = s.precision, s.blocks_to_swap
    out = report(s, gpu_gib)
    parts = plan(s).parts
    offload = values.get("offload", "none")
    encode = parts["weights_resident"] + parts["swap_buffers"] if offload == "none" else 0.0
    encode += text_encoder_bytes() / GIB
    out["encode_peak_gib"] = round(encode, 1)
    if offload == "none":  # it waits in host memory after encoding; offload='model' reads it from disk each time
        out["host_ram_gib"] = round(out["host_ram_gib"] + text_encoder_bytes() / GIB, 1)
    out["summary"] = (f"full-size model at {h}x{w}x{req.num_frames}, {prec}, {swap} blocks swapped, "
                      f"{'CFG' if req.guidance > 1 else 'no guidance'}: predicted denoising peak {out['peak_gib']} GiB "
                      f"GPU, {out['host_ram_gib']} GiB host RAM; while encoding the prompt {out['encode_peak_gib']} GiB "
                      f"({'text encoder + the DiT' if offload == 'none' else 'text encoder alone, offload=model'})")
    if gpu_gib and offload == "none" and encode > gpu_gib - 1.0:
        out["fits"] = False
        out["advice"] = ((out["advice"] + "; ") if out["advice"] else "") + (
            f"the text encoder ({text_encoder_bytes() / GIB:.1f} GiB) and the DiT do not fit together "
            f"({encode:.1f} GiB > {gpu_gib - 1.0:.1f} GiB usable): set offload='model'")
    return out
