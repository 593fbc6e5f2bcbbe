"""The sampler: text-to-video, image-to-video and video continuation, as the official pipeline does
it (spec §7): FlowMatchEuler with shift 12 on an explicit sigma list, the DiT output negated before
each Euler step, CFG-Zero* guidance, conditioning latents held clean with timestep 0.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .io import atomic_write_json
from .text import encode_prompts
from .vae import check_num_frames, check_size, decode_latents, encode_video, from_uint8_frames, to_uint8_frames

SHIFT = 12.0
NUM_TRAIN_TIMESTEPS = 1000
MODES = ("t2v", "i2v", "continuation")

# 480p buckets of the official pipeline (ratio H/W -> (H, W)), spec §7.10
BUCKETS_480P = {
    0.26: (320, 1216), 0.31: (352, 1120), 0.38: (384, 1024), 0.43: (416, 960), 0.52: (448, 864),
    0.58: (480, 832), 0.67: (512, 768), 0.74: (544, 736), 0.86: (576, 672), 0.95: (608, 640),
    1.05: (640, 608), 1.17: (672, 576), 1.29: (704, 544), 1.35: (736, 544), 1.50: (768, 512),
    1.67: (800, 480), 1.73: (832, 480), 2.00: (896, 448), 2.31: (960, 416), 2.58: (992, 384),
    2.75: (1056, 384), 3.09: (1088, 352), 3.70: (1184, 320), 3.80: (1216, 320), 3.90: (1248, 320),
    4.00: (1280, 320),
}


class SampleError(ValueError):
    """Sampling settings that cannot work, with the fix."""


# ---------------------------------------------------------------------------------------------
# schedules (pure functions; numbers checked against spec §7.3 in the tests)
# ---------------------------------------------------------------------------------------------
def shift_sigma(s, shift: float = SHIFT):
    return shift * s / (1 + (shift - 1) * s)


def base_sigmas(steps: int, distilled: bool = False) -> torch.Tensor:
    """The σ list the pipeline hands to ``set_timesteps`` (before the scheduler's shift)."""
    if distilled:
        grid = torch.arange(1, 51, dtype=torch.float32) * 20 / NUM_TRAIN_TIMESTEPS  # 0.02 .. 1.00
        idx = torch.linspace(0, 50, steps + 1)[:-1].floor().long()  # 16 steps: 0,3,6,...,46
        return grid.flip(0)[idx]
    return torch.linspace(1.0, 0.001, steps)


def timesteps_for(steps: int, mode: str = "normal") -> list[float]:
    """Model timesteps (1000·σ after the shift) of a schedule: normal | distilled | enhance_hf | refine."""
    if mode in ("normal", "distilled"):
        return [float(NUM_TRAIN_TIMESTEPS * shift_sigma(s)) for s in base_sigmas(steps, mode == "distilled")]
    normal = timesteps_for(steps, "normal")
    if mode == "enhance_hf":  # keep the high-noise part, then 10 uniform steps 500 .. 50
        return [t for t in normal if t > 500] + [500.0 - 50 * i for i in range(10)]
    if mode == "refine":  # start from t = 500 (σ = 0.5 re-noised input), follow the normal tail
        return [500.0] + [t for t in normal if t < 500]
    raise SampleError(f"schedule {mode!r}: use normal, distilled, enhance_hf or refine")


def set_scheduler(scheduler, steps: int, mode: str, device) -> list[float]:
    """Configure the checkpoint's FlowMatchEulerDiscreteScheduler (shift 12) for a schedule."""
    if mode in ("normal", "distilled"):
        scheduler.set_timesteps(steps, sigmas=base_sigmas(steps, mode == "distilled").tolist(), device=device)
    else:
        # explicit timesteps: give the scheduler σ = t/1000 and no shift (already applied)
        ts = timesteps_for(steps, mode)
        sig = torch.tensor(ts) / NUM_TRAIN_TIMESTEPS
        scheduler.set_timesteps(len(ts), sigmas=(sig / (SHIFT - (SHIFT - 1) * sig)).tolist(), device=device)
    return scheduler.timesteps.tolist()


def cfg_zero_star(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero* 'optimized scale', per sample: s* = <c,u>/(|u|²+1e-8); v = s*·u + g·(c − s*·u)."""
    B = cond.shape[0]
    c, u = cond.reshape(B, -1).float(), uncond.reshape(B, -1).float()
    s = ((c * u).sum(1) / (u.square().sum(1) + 1e-8)).view(B, *([1] * (cond.dim() - 1)))
    return s * uncond.float() + scale * (cond.float() - s * uncond.float())


def i2v_bucket(height: int, width: int) -> tuple[int, int]:
    ratio = height / width
    return BUCKETS_480P[min(BUCKETS_480P, key=lambda r: abs(r - ratio))]


# ---------------------------------------------------------------------------------------------
# request / result
# ---------------------------------------------------------------------------------------------
@dataclass
class SampleRequest:
    prompt: str
    negative_prompt: Optional[str] = None  # None/"" with guidance > 1 -> the empty prompt
    mode: str = "t2v"
    image: Optional[object] = None  # path or uint8 [H, W, 3] (i2v)
    video: Optional[object] = None  # path or uint8 [F, H, W, 3] (continuation)
    num_cond_frames: int = 13
    height: int = 480
    width: int = 832
    num_frames: int = 93
    steps: int = 50
    guidance: float = 4.0
    seed: int = 0
    fps: int = 15
    schedule: str = "normal"  # normal | distilled | enhance_hf
    use_kv_cache: bool = True

    def validate(self) -> "SampleRequest":
        if self.mode not in MODES:
            raise SampleError(f"mode={self.mode!r}: choose one of {MODES}")
        check_size(self.height, self.width, 16, "sample size")
        check_num_frames(self.num_frames, "num_frames")
        if self.steps < 1:
            raise SampleError(f"steps={self.steps}: use at least 1 (50 is the official default)")
        if self.guidance < 1:
            raise SampleError(f"guidance={self.guidance}: use 1 (no guidance) or more (4.0 is the default)")
        if self.fps <= 0:
            raise SampleError(f"fps={self.fps}: must be positive (15 for the base model)")
        if not isinstance(self.seed, int):
            raise SampleError(f"seed={self.seed!r}: must be a whole number")
        if self.mode == "i2v" and self.image is None:
            raise SampleError("mode='i2v' needs an image (a path or an array)")
        if self.mode == "continuation":
            if self.video is None:
                raise SampleError("mode='continuation' needs a video to continue (a path or frames)")
            check_num_frames(self.num_cond_frames, "num_cond_frames")
            if self.num_cond_frames >= self.num_frames:
                raise SampleError(f"num_cond_frames={self.num_cond_frames} must be below num_frames={self.num_frames}")
        return self


@dataclass
class SampleResult:
    video: np.ndarray  # uint8 [F, H, W, 3]
    latents: torch.Tensor  # normalized [1, 16, T, h, w]
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def _as_frames(obj) -> np.ndarray:
    if isinstance(obj, (str, Path)):
        from .data.video import VIDEO_EXTS, decode_frames, load_image, probe

        p = Path(obj)
        if p.suffix.lower() in VIDEO_EXTS:
            return decode_frames(p, list(range(probe(p).frame_count)))
        return load_image(p)[None]
    arr = np.asarray(obj, dtype=np.uint8)
    return arr[None] if arr.ndim == 3 else arr


def _condition_latents(vae, req: SampleRequest, g: torch.Generator) -> tuple[Optional[torch.Tensor], int]:
    from .data.video import crop_resize

    if req.mode == "t2v":
        return None, 0
    if req.mode == "i2v":
        frames = _as_frames(req.image)[:1]
    else:
        frames = _as_frames(req.video)
        if len(frames) < req.num_cond_frames:
            raise SampleError(f"the video has {len(frames)} frames; continuation needs num_cond_frames={req.num_cond_frames}")
        frames = frames[-req.num_cond_frames:]
    # resize without crop, like the pipeline's VideoProcessor
    frames = crop_resize(frames, req.height, req.width, policy="none")
    z = encode_video(vae, from_uint8_frames(frames), generator=g)
    return z, z.shape[2]


@torch.no_grad()
def generate(components, req: SampleRequest, loras: Optional[list] = None, progress: Optional[Callable] = None,
             callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
             text: Optional[tuple] = None, offload_text_encoder: bool = True) -> SampleResult:
    """Sample one video. ``components`` needs dit, vae, scheduler and (unless ``text`` gives
    precomputed (embeds, mask) for [negative, positive]) tokenizer + text_encoder. ``callback(i, t,
    latents)`` sees the latents after every step. LoRAs [(path, scale)] are applied for this call."""
    from . import lora as lora_lib

    req.validate()
    t0 = time.time()
    dit, vae = components.dit, components.vae
    device = next(dit.parameters()).device
    dtype = next(p for p in dit.parameters() if p.is_floating_point()).dtype
    g = torch.Generator().manual_seed(req.seed)
    guided = req.guidance > 1 and req.schedule != "distilled"

    # text: encode, then move the encoder off the accelerator
    if text is None:
        prompts = ([req.negative_prompt or ""] if guided else []) + [req.prompt]
        emb, mask = encode_prompts(components.tokenizer, components.text_encoder, prompts, device=device, dtype=dtype)
        if offload_text_encoder and next(components.text_encoder.parameters()).device.type != "cpu":
            components.text_encoder.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    else:
        emb, mask = (x.to(device) for x in text)
        emb = emb.to(dtype)
        if not guided:
            emb, mask = emb[-1:], mask[-1:]

    # latents: noise from a CPU generator (same on every device), conditioning frames in front
    C = dit.config.in_channels
    T = 1 + (req.num_frames - 1) // 4
    shape = (1, C, T, req.height // 8, req.width // 8)
    latents = torch.randn(shape, generator=g, dtype=torch.float32).to(device)
    cond, n_cond = _condition_latents(vae, req, g)
    if cond is not None:
        latents[:, :, :n_cond] = cond.to(device)
    kv_cache = None
    if n_cond and req.mode == "continuation" and req.use_kv_cache:
        # prompt-independent cache of the conditioning tokens (spec §4), shared by the CFG batch
        _, kv_cache = dit(latents[:, :, :n_cond].to(dtype), torch.zeros(1, n_cond, device=device),
                          torch.zeros_like(emb[:1]), None, return_kv=True, skip_crs_attn=True)

    names = lora_lib.apply_loras(dit, loras) if loras else []
    sched = components.scheduler
    timesteps = set_scheduler(sched, req.steps, req.schedule, device)
    bar = progress(total=len(timesteps), desc="denoising") if progress else None
    try:
        for i, t in enumerate(timesteps):
            x = latents.to(dtype)
            B = emb.shape[0]
            if kv_cache is not None:
                x_in = x[:, :, n_cond:].expand(B, -1, -1, -1, -1)
                ts = torch.full((B,), float(t), device=device)
                out = dit(x_in, ts, emb, mask, num_cond_latents=n_cond, kv_cache_dict=kv_cache)
                out = torch.cat([out.new_zeros(B, C, n_cond, *out.shape[3:]), out], dim=2)
            else:
                ts = torch.full((B, T), float(t), device=device)
                ts[:, :n_cond] = 0.0
                out = dit(x.expand(B, -1, -1, -1, -1), ts, emb, mask, num_cond_latents=n_cond)
            v = cfg_zero_star(out[1:], out[:1], req.guidance) if guided else out.float()
            # the DiT predicts x0 − ε; the Euler step of the scheduler wants dx/dσ = ε − x0
            stepped = sched.step(-v, t, latents, return_dict=False)[0]
            latents = torch.cat([latents[:, :, :n_cond], stepped[:, :, n_cond:]], dim=2) if n_cond else stepped
            if callback is not None:
                callback(i, float(t), latents)
            if bar is not None:
                bar.update(1)
    except torch.cuda.OutOfMemoryError as e:
        from .planner import PlanSettings, suggest

        budget = torch.cuda.get_device_properties(device).total_memory / 2**30 - 1
        sug = suggest(PlanSettings(mode="sample", height=req.height, width=req.width, num_frames=req.num_frames,
                                   cfg=guided), budget)
        fix = f"load with {sug[0]} (memory.apply_block_swap)" if sug else "lower the resolution or the frame count"
        raise SampleError(f"out of GPU memory while sampling {req.height}x{req.width}x{req.num_frames}: {fix}") from e
    finally:
        if bar is not None:
            bar.close()
        if names:
            lora_lib.remove_loras(dit, names)

    video = decode_latents(vae, latents.to(next(vae.parameters()).device))
    frames = to_uint8_frames(video)[0]
    settings = {k: v for k, v in asdict(req).items() if k not in ("image", "video")}
    settings.update(image=str(req.image) if isinstance(req.image, (str, Path)) else None,
                    video=str(req.video) if isinstance(req.video, (str, Path)) else None,
                    loras=[[str(p), float(s)] for p, s in (loras or [])], timesteps=[round(x, 3) for x in timesteps])
    return SampleResult(video=frames, latents=latents.cpu(), settings=settings, seconds=time.time() - t0)


def save_sample(result: SampleResult, run_dir, name: str, fps: Optional[int] = None) -> Path:
    """run_dir/samples/<name>.mp4 plus <name>.json with the settings that made it."""
    from .data.video import write_mp4

    out = Path(run_dir) / "samples" / f"{name}.mp4"
    write_mp4(out, result.video, fps or result.settings.get("fps", 15))
    atomic_write_json(out.with_suffix(".json"), {**result.settings, "seconds": round(result.seconds, 2)})
    return out


def checkpoint_offers(components) -> dict:
    """Optional modes the checkpoint's lora/ folder enables."""
    return {"distilled": "cfg_step_lora" in components.loras, "refinement": "refinement_lora" in components.loras}


# ---------------------------------------------------------------------------------------------
# 720p refinement stage (spec §7.9): stage-1 video -> 704x1280 (30 fps) with refinement_lora + BSA
# ---------------------------------------------------------------------------------------------
BUCKETS_720P_F64 = {
    0.22: (448, 2048), 0.29: (512, 1792), 0.36: (576, 1600), 0.45: (640, 1408), 0.55: (704, 1280),
    0.63: (768, 1216), 0.76: (832, 1088), 0.88: (896, 1024), 1.00: (960, 960), 1.14: (1024, 896),
    1.31: (1088, 832), 1.50: (1152, 768), 1.58: (1216, 768), 1.82: (1280, 704), 1.91: (1344, 704),
    2.20: (1408, 640), 2.30: (1472, 640), 2.67: (1536, 576), 2.89: (1664, 576), 3.62: (1856, 512),
    3.75: (1920, 512),
}


def refine_size(height: int, width: int) -> tuple[int, int]:
    ratio = height / width
    return BUCKETS_720P_F64[min(BUCKETS_720P_F64, key=lambda r: abs(r - ratio))]


def upsample_for_refinement(frames: np.ndarray, height: int, width: int, double_frames: bool = True) -> torch.Tensor:
    """uint8 [F1, H, W, 3] -> [1, 3, F2, height, width] in [-1, 1]: bilinear in space, then linear in
    time to 2·F1 frames (both align_corners=True), as the official refinement input."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True) / 255.0
    x = x.permute(1, 0, 2, 3)[None]  # [1, 3, F1, H, W]
    f2 = 2 * x.shape[2] if double_frames else x.shape[2]
    x = F.interpolate(x, size=(f2, height, width), mode="trilinear", align_corners=True)
    return x * 2 - 1


@torch.no_grad()
def refine(components, frames: np.ndarray, prompt: str = "", steps: int = 50, t_thresh: float = 0.5,
           size: Optional[tuple] = None, double_frames: bool = True, seed: int = 0,
           loras: Optional[list] = None, use_bsa: bool = True, progress: Optional[Callable] = None) -> SampleResult:
    """Refine a stage-1 (480p, 15 fps) text-to-video clip to 720p/30 fps. Uses the checkpoint's
    ``refinement_lora`` unless ``loras`` is given, positive prompt only, no guidance, block-sparse
    attention when available, 5 denoising steps from σ = t_thresh (with steps = 50)."""
    from . import lora as lora_lib
    from .vae import latent_frames

    dit, vae = components.dit, components.vae
    device = next(dit.parameters()).device
    dtype = next(p for p in dit.parameters() if p.is_floating_point()).dtype
    if loras is None:
        if "refinement_lora" not in components.loras:
            raise SampleError(f"refinement needs {components.folder}/lora/refinement_lora.safetensors "
                              "(or pass loras=[(path, scale)])")
        loras = [(components.loras["refinement_lora"], 1.0)]
    h, w = size or refine_size(frames.shape[1], frames.shape[2])
    check_size(h, w, 16, "refinement size")
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    video = upsample_for_refinement(frames, h, w, double_frames)
    f2 = video.shape[2]
    # latents in multiples of 4 for BSA's 4x4x4 blocks: pad the end with copies of the last frame
    m = math.ceil(math.ceil(f2 / 4) / 4) * 4
    padded = 1 + 4 * (m - 1)
    if padded > f2:
        video = torch.cat([video, video[:, :, -1:].expand(-1, -1, padded - f2, -1, -1)], dim=2)
    z = encode_video(vae, video, generator=g).to(device)
    noise = torch.randn(z.shape, generator=g, dtype=torch.float32).to(device)
    latents = (1 - t_thresh) * z + t_thresh * noise
    emb, mask = encode_prompts(components.tokenizer, components.text_encoder, [prompt], device=device, dtype=dtype)
    names = lora_lib.apply_loras(dit, loras)
    previous = getattr(dit, "attention_backend", "sdpa")
    if use_bsa:
        dit.enable_bsa()
    ts_all = timesteps_for(steps, "refine")
    ts_all[0] = 1000.0 * t_thresh
    sched = components.scheduler
    sig = torch.tensor(ts_all) / NUM_TRAIN_TIMESTEPS
    sched.set_timesteps(len(ts_all), sigmas=(sig / (SHIFT - (SHIFT - 1) * sig)).tolist(), device=device)
    bar = progress(total=len(ts_all), desc="refining") if progress else None
    try:
        for t in sched.timesteps.tolist():
            out = dit(latents.to(dtype), torch.full((1,), float(t), device=device), emb, mask)
            latents = sched.step(-out.float(), t, latents, return_dict=False)[0]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        lora_lib.remove_loras(dit, names)
        dit.set_attention_backend(previous)
    out_frames = to_uint8_frames(decode_latents(vae, latents.to(next(vae.parameters()).device)))[0][:f2]
    settings = {"mode": "refine", "prompt": prompt, "height": h, "width": w, "num_frames": int(f2), "steps": steps,
                "t_thresh": t_thresh, "seed": seed, "fps": 30 if double_frames else 15,
                "latent_frames": int(latent_frames(padded)), "loras": [[str(p), float(s)] for p, s in loras],
                "timesteps": [round(x, 3) for x in sched.timesteps.tolist()]}
    return SampleResult(video=out_frames, latents=latents.cpu(), settings=settings, seconds=time.time() - t0)
