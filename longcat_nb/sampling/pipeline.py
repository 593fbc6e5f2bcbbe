"""The denoising pipeline: text-to-video, image-to-video and video continuation, computing what the
official pipeline computes (spec §6-§7), in the same order:

* prompts cleaned and UMT5-encoded to 512 tokens; with guidance > 1 a negative prompt (the empty
  one when none is given) goes first in the CFG batch [negative, positive];
* noise from a seeded CPU generator (identical on every device), then the conditioning frames
  encoded with the same generator (a posterior sample), normalized and written into the first
  latent frames, which keep timestep 0 and are never stepped;
* the checkpoint's FlowMatchEuler scheduler (shift 12) on an explicit sigma list (normal, the
  16-step distilled list, ``enhance_hf``, refinement: flow.set_scheduler), CFG-Zero* guidance per
  sample, and the DiT output (x0 − ε) negated before each Euler step;
* continuation through a prompt-independent KV cache of the conditioning tokens by default.

``generate`` takes loaded components and changes nothing on them beyond the call: LoRAs it is given
(and the checkpoint's ``cfg_step_lora`` for ``distilled``) are applied for the call and removed
after, so the training loop can pass its in-memory DiT with a LoRA already injected.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..flow import NUM_TRAIN_TIMESTEPS, set_scheduler
from ..lora.adapters import temporary_loras
from ..text import encode_prompts, named_encoder, required_encoder
from ..vae import check_size, decode_latents, encode_video, to_uint8_frames
from .load import _exec_device, _memory, _param_device, dit_dtype, placed, vae_tiling
from .request import (DISTILL_LORA, SampleError, SampleRequest, SampleResult, load_image_frames, load_video_frames,
                      preprocess_frames, sample_size)


# ---------------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------------
def cfg_zero_star(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero* 'optimized scale' per sample: s* = ⟨c, u⟩ / (‖u‖² + 1e-8) over all C·T·H·W
    elements, v = s*·u + g·(c − s*·u). s* is broadcast per sample ([B, 1, 1, 1, 1]; the official
    4-D view is right only for batch 1). Float32 out."""
    B = cond.shape[0]
    c, u = cond.float(), uncond.float()
    cf, uf = c.reshape(B, -1), u.reshape(B, -1)
    s = (cf * uf).sum(1, keepdim=True) / (uf.square().sum(1, keepdim=True) + 1e-8)
    s = s.view(B, *([1] * (cond.dim() - 1)))
    return u * s + scale * (c - u * s)


# ---------------------------------------------------------------------------------------------
# progress and out-of-memory advice
# ---------------------------------------------------------------------------------------------
def _clock(dev):
    """A timer that waits for ``dev``'s queued work first, so a phase's seconds are its own."""
    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()
    return now


def _progress(progress, total: int, desc: str):
    if not progress:
        return None
    if progress is True:  # the notebook stage passes ui.widgets.progress instead (plain text headless)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc)
    return progress(total=total, desc=desc)


def _oom_error(e: Exception, device, height: int, width: int, num_frames: int, guided: bool,
               memory: Optional[dict] = None) -> SampleError:
    from ..planner import sampling_plan_settings, suggest

    memory = memory or {}
    budget = torch.cuda.get_device_properties(device).total_memory / 2**30 - 1
    sug = suggest(sampling_plan_settings(height, width, num_frames, guided=guided,
                                         precision=memory.get("precision", "bf16"),
                                         blocks_to_swap=memory.get("blocks_to_swap", 0)), budget)
    fix = (f"load the DiT with {sug[0]} (04_sample: blocks_to_swap; load_sampling_components), and/or "
           "precision='int8', and sample with offload='model'" if sug
           else "use offload='model', precision='int8', or lower the resolution or the frame count")
    return SampleError(f"out of GPU memory while sampling {height}x{width}x{num_frames}: {fix}")


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def encode_text(components, prompt: str, negative_prompt: Optional[str], guided: bool, device, dtype,
                offload: str = "none", text_encoder_to_cpu: bool = True,
                encoder: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [B, 1, 512, C], mask [B, 512]) for [negative, positive] (guided) or [positive].
    The text encoder runs where it is (offload='model': on ``device`` for the call) and is moved to
    the CPU afterwards when ``text_encoder_to_cpu`` (it is not needed while denoising). ``encoder``
    (text.required_encoder of the LoRAs): the cache's other encoder, loaded for this call and freed."""
    prompts = ([negative_prompt or ""] if guided else []) + [prompt]
    device = torch.device(device)
    if encoder is not None:  # a LoRA trained on Qwen2.5-VL embeddings: UMT5 ones would be out of distribution
        from ..model_files import pick_dtype

        emb, mask = named_encoder(encoder, device, pick_dtype("auto", device))(prompts)
        return emb.to(device=device, dtype=dtype), mask.to(device)
    tok, enc = components.tokenizer, components.text_encoder
    if enc is None and getattr(components, "text_encoder_on_demand", None) is not None:
        return _encode_on_demand(components, prompts, device, dtype)
    if tok is None or enc is None:
        raise SampleError("no text encoder loaded: load_components(...) with the 'tokenizer' and 'text_encoder' "
                          "parts, or pass text=(embeddings, mask) for [negative, positive]")
    with placed(enc, device, offload == "model"):
        emb, mask = encode_prompts(tok, enc, prompts, device=device, dtype=dtype)
    if text_encoder_to_cpu and offload != "model" and _param_device(enc).type != "cpu":
        enc.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return emb, mask


def _encode_on_demand(components, prompts: list, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """offload='model' (sampling.load_sampling_components): the text encoder read from the checkpoint
    straight onto ``device`` for this encoding and freed after it, so host memory never holds it."""
    from ..model_files import load_text_encoder

    enc = load_text_encoder(components.folder, device, components.text_encoder_on_demand)
    try:
        return encode_prompts(components.tokenizer, enc, prompts, device=device, dtype=dtype)
    finally:
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _text_batch(text, guided: bool, device, dtype):
    emb, mask = text
    emb, mask = emb.to(device=device, dtype=dtype), mask.to(device)
    if emb.dim() == 3:
        emb = emb[:, None]
    if guided and emb.shape[0] < 2:
        raise SampleError("guidance > 1 needs text=(embeddings, mask) for [negative, positive] (2 rows); "
                          "encode the empty prompt as the negative")
    return (emb[-2:], mask[-2:]) if guided else (emb[-1:], mask[-1:])


# ---------------------------------------------------------------------------------------------
# the denoising loop
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def build_kv_cache(dit, cond_latents: torch.Tensor, text_like: torch.Tensor, offload_kv_cache: bool = False) -> dict:
    """Per-block (k, v) of the conditioning tokens (t = 0, self-attention only, no text): prompt
    independent, shared by both CFG rows (spec §4)."""
    dtype = dit_dtype(dit)
    n = cond_latents.shape[2]
    t = torch.zeros(cond_latents.shape[0], n, device=cond_latents.device, dtype=dtype)
    _, cache = dit(cond_latents.to(dtype), t, torch.zeros_like(text_like[:1]), None, return_kv=True,
                   skip_crs_attn=True, offload_kv_cache=offload_kv_cache)
    return cache


@torch.no_grad()
def predict_velocity(dit, latents: torch.Tensor, t: float, emb: torch.Tensor, mask: torch.Tensor,
                     guidance: float, num_cond_latents: int = 0, kv_cache: Optional[dict] = None) -> torch.Tensor:
    """One guided DiT evaluation: the velocity (x0 − ε, float32) for the noisy frames of ``latents``
    [1, C, T, h, w]. The CFG batch is [negative, positive] when guidance > 1."""
    dtype = dit_dtype(dit)
    n = num_cond_latents
    B = emb.shape[0]
    if kv_cache is not None:
        x = latents[:, :, n:].to(dtype)
        ts = torch.full((B,), float(t), device=latents.device, dtype=dtype)
        out = dit(torch.cat([x] * B), ts, emb, mask, num_cond_latents=n, kv_cache_dict=kv_cache)
    else:
        x = latents.to(dtype)
        ts = torch.full((B, latents.shape[2]), float(t), device=latents.device, dtype=dtype)
        ts[:, :n] = 0  # conditioning frames are clean
        out = dit(torch.cat([x] * B), ts, emb, mask, num_cond_latents=n)
    # CFG over every output element, conditioning frames included (as the pipeline sums them)
    v = cfg_zero_star(out[1:], out[:1], guidance) if guidance > 1 else out.float()
    return v if kv_cache is not None else v[:, :, n:]


@torch.no_grad()
def denoise(dit, scheduler, latents: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor, steps: int,
            schedule: str = "normal", guidance: float = 1.0, num_cond_latents: int = 0, use_kv_cache: bool = False,
            offload_kv_cache: bool = False, t_thresh: float = 0.5, progress=None,
            callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
            preview: Optional[Callable] = None) -> tuple[torch.Tensor, list]:
    """Run the Euler loop on ``latents`` [1, C, T, h, w] (fp32; the first ``num_cond_latents`` frames
    are clean conditioning and are never changed). Returns (latents, timesteps).
    ``callback(i, t, latents)`` sees all frames after every step; ``preview(i, σ, latents, v)`` (see
    longcat_nb.preview) sees the step's input and the guided velocity, before the step."""
    n = num_cond_latents
    timesteps = set_scheduler(scheduler, steps, schedule, latents.device, t_thresh)
    kv_cache = build_kv_cache(dit, latents[:, :, :n], emb, offload_kv_cache) if (use_kv_cache and n) else None
    bar = _progress(progress, len(timesteps), "refining" if schedule == "refine" else "denoising")
    try:
        for i, t in enumerate(scheduler.timesteps):
            v = predict_velocity(dit, latents, t, emb, mask, guidance, n, kv_cache)
            if preview is not None:
                preview(i, float(t) / NUM_TRAIN_TIMESTEPS, latents[:, :, n:], v)
            # the DiT predicts x0 − ε; the scheduler's Euler step wants dx/dσ = ε − x0
            noisy = scheduler.step(-v, t, latents[:, :, n:], return_dict=False)[0]
            latents = torch.cat([latents[:, :, :n], noisy], dim=2) if n else noisy
            if callback is not None:
                callback(i, float(t), latents)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return latents, timesteps


def _schedule_name(req: SampleRequest) -> str:
    if req.distilled:
        return "distilled"
    return "enhance_hf" if req.enhance_hf else "normal"


def _describe(x) -> Optional[str]:
    if x is None or isinstance(x, (str, Path)):
        return str(x) if x is not None and str(x) else None
    shape = getattr(x, "shape", None) or getattr(x, "size", None)
    return f"<{type(x).__name__} {tuple(shape) if shape is not None else ''}>"


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def _loras_for(components, req: SampleRequest, loras: Optional[Sequence[tuple]]) -> list:
    """The LoRAs of the call: the checkpoint's cfg_step_lora first when distilled, then the caller's."""
    lora_list = list(loras or [])
    if req.distilled:
        if DISTILL_LORA not in (components.loras or {}):
            where = Path(components.folder) / "lora" / f"{DISTILL_LORA}.safetensors"
            raise SampleError(f"distilled=True needs {where} (download lora/ from meituan-longcat/LongCat-Video), "
                              "or set distilled=False")
        lora_list = [(components.loras[DISTILL_LORA], 1.0)] + lora_list
    return lora_list


def _conditioning_frames(req: SampleRequest):
    """uint8 [k, H, W, 3] frames held clean in front (the image, the video's last k), None for t2v."""
    if req.mode == "i2v":
        return load_image_frames(req.image)
    if req.mode != "continuation":
        return None
    frames = load_video_frames(req.video, req.fps, last=req.num_cond_frames)
    if len(frames) < req.num_cond_frames:
        raise SampleError(f"the video has {len(frames)} frames at {req.fps} fps; continuation needs "
                          f"num_cond_frames={req.num_cond_frames}: lower it (4k+1) or give a longer video")
    return frames[-req.num_cond_frames:]


def _set_size(req: SampleRequest, cond_frames) -> None:
    """The conditioning frames decide the size unless height/width are given (sample_size)."""
    req.height, req.width = sample_size(req, None if cond_frames is None else cond_frames.shape[1:3])
    try:
        check_size(req.height, req.width, req.size_multiple, "sample size")
    except ValueError as e:
        raise SampleError(str(e)) from None


def _initial_latents(components, req: SampleRequest, cond_frames, dev, offload: str) -> tuple[torch.Tensor, int]:
    """(latents on ``dev``, number of conditioning latents): noise from a CPU generator, then the
    conditioning frames encoded with the same generator (the official order)."""
    g = torch.Generator().manual_seed(int(req.seed))
    C = components.dit.config.in_channels
    T = 1 + (req.num_frames - 1) // 4
    latents = torch.randn((1, C, T, req.height // 8, req.width // 8), generator=g, dtype=torch.float32)
    n_cond = 0
    if cond_frames is not None:
        pixels = preprocess_frames(cond_frames, req.height, req.width)
        with placed(components.vae, dev, offload == "model"):
            z = encode_video(components.vae, pixels, generator=g)
        n_cond = z.shape[2]
        latents[:, :, :n_cond] = z.float().cpu()
    return latents.to(dev), n_cond


def run_record(components, loras: Sequence[tuple], timesteps, dev, dtype) -> dict:
    """The part of a clip's settings record that says what ran it: LoRAs, timesteps, model, device."""
    return dict(loras=[[str(p), float(s)] for p, s in loras], timesteps=[round(float(x), 3) for x in timesteps],
                checkpoint=str(getattr(components, "folder", "")), device=str(dev),
                dtype=str(dtype).replace("torch.", ""), **_memory(components))


@torch.no_grad()
def generate(components, request: SampleRequest, loras: Optional[Sequence[tuple]] = None, progress=True,
             callback: Optional[Callable[[int, float, torch.Tensor], None]] = None, *,
             text: Optional[tuple] = None, offload: str = "none", device=None, text_encoder_to_cpu: bool = True,
             vae_tiling_enabled: Optional[bool] = None, offload_kv_cache: bool = False,
             preview: Optional[Callable] = None) -> SampleResult:
    """Sample one video (T2V, I2V or continuation) with loaded ``components`` (dit, vae, scheduler,
    and tokenizer + text_encoder unless ``text`` gives precomputed (embeddings, mask) rows
    [negative, positive]).

    loras: [(path, scale), ...] applied for this call only (any layout; scale 0 == base).
    progress: True = a tqdm.auto bar, False = none, or a tqdm-like factory.
    callback(i, t, latents): after every step, with all latent frames (conditioning included).
    preview(i, σ, latents, v): before every step (longcat_nb.preview.preview_every makes one).
    offload: 'none' (models stay where they are) or 'model' (text encoder, DiT and VAE each moved
    to ``device`` only while they run). vae_tiling_enabled: tiled VAE for this call (None = as is).
    """
    req = request.resolved().validate()
    t0 = time.perf_counter()
    dit, vae = components.dit, components.vae
    if dit is None or vae is None or components.scheduler is None:
        raise SampleError("generate needs components with dit, vae and scheduler loaded (model_files.load_components)")
    dev = _exec_device(dit, offload, device)
    dtype = dit_dtype(dit)
    guided = req.guidance > 1
    lora_list = _loras_for(components, req, loras)
    cond_frames = _conditioning_frames(req)
    _set_size(req, cond_frames)

    # text first, so the encoder can leave the GPU before the DiT needs it
    clock = _clock(dev)
    if text is not None:
        emb, mask = _text_batch(text, guided, dev, dtype)
    else:
        emb, mask = encode_text(components, req.prompt, req.negative_prompt, guided, dev, dtype, offload,
                                text_encoder_to_cpu, required_encoder(p for p, _ in lora_list))
    latents, n_cond = _initial_latents(components, req, cond_frames, dev, offload)
    marks = {"text": clock()}
    steps = [marks["text"]]

    def timed(i, t, x):
        steps.append(clock())
        if callback is not None:
            callback(i, t, x)

    schedule = _schedule_name(req)
    try:
        with temporary_loras(dit, lora_list), placed(dit, dev, offload == "model"):
            steps[0] = marks["place"] = clock()
            latents, timesteps = denoise(
                dit, components.scheduler, latents, emb, mask, req.steps, schedule, req.guidance, n_cond,
                use_kv_cache=req.mode == "continuation" and req.use_kv_cache, offload_kv_cache=offload_kv_cache,
                progress=progress, callback=timed, preview=preview)
    except torch.cuda.OutOfMemoryError as e:
        raise _oom_error(e, dev, req.height, req.width, req.num_frames, guided, _memory(components)) from e

    marks["denoised"] = clock()
    with placed(vae, dev, offload == "model"), vae_tiling(vae, vae_tiling_enabled):
        frames = to_uint8_frames(decode_latents(vae, latents))[0]
    timings = {"text_s": marks["text"] - t0, "place_s": marks["place"] - marks["text"],
               "steps_s": [b - a for a, b in zip(steps, steps[1:])], "decode_s": clock() - marks["denoised"]}
    settings = {k: v for k, v in asdict(req).items() if k not in ("image", "video")}
    settings.update(image=_describe(req.image), video=_describe(req.video), schedule=schedule,
                    num_cond_latents=n_cond, **run_record(components, lora_list, timesteps, dev, dtype))
    return SampleResult(video=frames, latents=latents.cpu(), settings=settings, seconds=time.perf_counter() - t0,
                        timings=timings)


def compare_base_and_lora(components, request: SampleRequest, lora=None, scale: float = 1.0,
                          progress=True, **kwargs) -> dict:
    """{'base': result, 'lora': result} with the same seed and settings (text encoded once, and once
    more with the LoRA's own text encoder when its cache was not UMT5); only 'base' when ``lora`` is
    None. ``kwargs`` go to ``generate`` (offload, device, ...)."""
    req = request.resolved().validate()
    given = kwargs.pop("text", None)
    dev = _exec_device(components.dit, kwargs.get("offload", "none"), kwargs.get("device"))

    def encoded(encoder=None):
        return encode_text(components, req.prompt, req.negative_prompt, req.guidance > 1, dev,
                           dit_dtype(components.dit), kwargs.get("offload", "none"),
                           kwargs.get("text_encoder_to_cpu", True), encoder)

    text = given if given is not None else encoded()
    out = {"base": generate(components, req, None, progress, text=text, **kwargs)}
    if lora:
        encoder = required_encoder([lora])
        lora_text = text if given is not None or encoder is None else encoded(encoder)
        out["lora"] = generate(components, req, [(lora, scale)], progress, text=lora_text, **kwargs)
    return out
