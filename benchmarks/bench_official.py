"""The official LongCat-Video code beside ours, in one process on one CUDA GPU: block-sparse attention
kernels, a LoRA training step and a CFG sampling step of the full-size DiT. JSON out.

The official code is never part of this repository: OFFICIAL_LONGCAT names a folder that holds
``longcat_video/`` from meituan-longcat/LongCat-Video (default: ``.official`` at the repository root).
``benchmarks/parity_shim/flash_attn`` (torch SDPA) stands in for the flash_attn package it imports.

Run from the repository root (the official also needs einops, which it imports):

    OFFICIAL_LONGCAT=.official python benchmarks/bench_official.py --cases bsa_kernel
    OFFICIAL_LONGCAT=.official python benchmarks/bench_official.py --cases train_dense --ours none
    OFFICIAL_LONGCAT=.official python benchmarks/bench_official.py --cases train_dense --official none --ours glue
    OFFICIAL_LONGCAT=.official python benchmarks/bench_official.py --cases train_dense --official none --ours glue_cudnn
    OFFICIAL_LONGCAT=.official python benchmarks/bench_official.py --cases sample_dense
    OFFICIAL_LONGCAT=.official python benchmarks/bench_official.py --cases sample_bsa,sample_bsa_512
    python benchmarks/bench_official.py                  # every case, default variants (.official by default)
    python benchmarks/bench_official.py --tiny           # plumbing check, CPU included (see below)

One device call is limited to 10 minutes and a full-size training variant (build, compile, warm-up
and timed steps) is long, so the lines above split the cases and the training variants over calls
(--official NAMES / --ours NAMES pick variants, "none" skips that side; each call writes its own
$OUT/official.json). Options: --repeat N (timed DiT steps, default 2), --warmup N (untimed steps
before them, default 1; the first step's wall time, compilation included, is reported apart),
--depth N (blocks, default 48), --grids (bsa_kernel shapes), --bsa-variants NAMES, --out PATH
(default $OUT/official.json, rewritten after every case). Each case runs in try/except and prints
one JSON line when it finishes (progress lines go to stderr); a short comparison table comes last.
Timings are medians after warm-up: triton.testing.do_bench for the kernels, perf_counter around
torch.cuda.synchronize for the DiT steps.

--tiny: a 2-block, 256-wide DiT (2 heads) on small latents, a 4x8x32 grid with 2 heads x 32 for the
kernels, float32 on the CPU, where TRITON_INTERPRET=1 is set so our Triton kernels run in Triton's
interpreter (slow). The official kernels use block pointers (tl.make_block_ptr), which Triton 3.9
removed, interpreter included: where the installed Triton lacks them, the official BSA is recorded
as skipped with that reason (its torch selection still runs and is compared with ours). On the CPU
our DiT's "bsa" backend falls back to dense SDPA (recorded).

Cases
-----
bsa_kernel   B=1, 32 heads x 128, bf16, sparsity 0.9375, 4x4x4 blocks, at latent grids 24x44x80
             (704x1280x93) and 24x32x56 (512x896x93). Official: ``flash_attn_bsa_3d`` as its DiT's
             self-attention calls it (rearrangement into 3-D blocks, selection, kernels, rearrangement
             back), forward and forward+backward; its pieces alone (rearrange, select, forward kernel,
             backward = delta pre-pass + selection inversion + dK/dV + dQ, the inversion alone) and a
             per-kernel profile. Ours: every entry of BSA_VARIANTS, the same timings, per-kernel profile,
             and the breakdown of the default kernels (selection, inversion, fwd, dq, dkdv). Errors vs the
             fp32 torch reference on two heads (out, dq, dk, dv), each with its own selection (ours:
             ``select_blocks``; the official: its own pooled bf16 selection, passed to the reference), the
             overlap of the two selections and the official-vs-ours output difference.
             Headline: ratio_ours_over_official (ms ours / ms official; < 1 = ours faster).
train_dense  One LoRA step of the full DiT at 480x832x93 (latent 16x24x60x104, 512 text tokens):
             random bf16 weights (identical state dicts, seeded per tensor name), rank-32 LoRA (alpha 32)
             on attn.qkv, attn.proj, cross_attn.q_linear, cross_attn.kv_linear, cross_attn.proj (peft
             ``inject_adapter_in_model`` on the official, ``longcat_nb.lora.add_lora`` on ours; the
             LoRA weights are then set identically, B = 0), fp32 LoRA weights, gradient checkpointing,
             AdamW, the flow-matching loss of ``longcat_nb.train``. The official runs as its demos do
             (``torch.compile(dit)``), ours per OUR_VARIANTS. Sec/step, first-step (compile) time, peak
             memory, losses (equal at the first step up to bf16 rounding: same weights, same seed).
sample_dense One CFG step (batch 2 [negative, positive] through the DiT, no grad) at 480x832x93, dense
             attention; official compiled vs OUR_VARIANTS, and each of ours vs the official's output on
             the same input (relative L2 difference; bf16 rounding only, about 1e-2 or less).
sample_bsa   The same with block-sparse self-attention (ours: ``set_attention_backend("bsa")``). The
             official cannot run BSA at 480x832 (h = 30 is not divisible by its 4x4x4 blocks): the case
             records the assertion its ``flash_attn_bsa_3d`` raises there instead of running it.
sample_bsa_512  BSA at 512x896x93 (grid 24x32x56, which the official accepts): official (``enable_bsa``,
             compiled) vs ours, output difference included (it also holds selection differences).

Adding a variant
----------------
* A kernel: add ``name: fn`` to BSA_VARIANTS, ``fn(q, k, v, grid, sel=None) -> o``: q, k, v
  [B, H, S, D] (tokens in (t, y, x) raster order of ``grid`` = (T, h, w), Sq = Sk), o [B, H, S, D],
  differentiable in q, k, v. ``sel`` ([B, H, Mq, K] int64 from ``select_blocks``) is passed only for
  the error check, and only when the function has a ``sel`` parameter (else its own selection is used
  and the record says so). Example:
  ``"ours_fwd64": lambda q, k, v, grid, sel=None: bsa_attention(q, k, v, grid, grid, 0.9375, sel=sel,
  config={"fwd": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}})``.
* A model setup: add ``name: setup`` to OUR_VARIANTS, ``setup(model) -> None | callable``: applied to our
  DiT after LoRA injection and gradient checkpointing (training) or after the attention backend is set
  (sampling); return None to run the model itself, or the callable to run instead (e.g. a compiled
  wrapper). Global state it changes (SDPA preference, compiled glue, dynamo caches) is reset after each
  variant. Run it with ``--ours name`` (defaults per case: DEFAULT_OURS). OFFICIAL_VARIANTS works the
  same way for the official model (``--official compile,eager``; ``none`` skips it).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OFFICIAL_ROOT = Path(os.environ.get("OFFICIAL_LONGCAT", str(ROOT / ".official"))).resolve()
sys.path.insert(0, str(HERE / "parity_shim"))
sys.path.insert(0, str(OFFICIAL_ROOT))
sys.path.insert(0, str(ROOT))

if "--tiny" in sys.argv[1:] and not torch.cuda.is_available():
    # Triton's CPU interpreter: set before anything imports Triton (diffusers does, through torchao)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def bsa_attention(*args, **kwargs):
    """``longcat_nb.models.bsa.bsa_attention``, imported on first call (after TRITON_INTERPRET is set)."""
    from longcat_nb.models.bsa import bsa_attention as impl

    return impl(*args, **kwargs)


GIB = 2**30
SPARSITY = 0.9375
CHUNK = (4, 4, 4)
BSA_PARAMS = {"sparsity": SPARSITY, "chunk_3d_shape_q": list(CHUNK), "chunk_3d_shape_k": list(CHUNK)}
TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj")
RANK = 32

# full size / --tiny: latent grids of the kernel case, latent (T, H, W) of the DiT cases, model config
KERNEL_GRIDS = {"704x1280x93": (24, 44, 80), "512x896x93": (24, 32, 56)}
TINY_KERNEL_GRIDS = {"tiny_4x8x32": (4, 8, 32)}  # 16 key blocks: the official keeps int(0.0625 * 16) = 1
DIT_LATENTS = {"480x832x93": (24, 60, 104), "512x896x93": (24, 64, 112)}
TINY_DIT_LATENTS = {"480x832x93": (5, 12, 16), "512x896x93": (8, 16, 64)}  # grid h 6 (not /4) ; 8x8x32
TINY_DIT = dict(hidden_size=256, depth=2, num_heads=2, caption_channels=64, adaln_tembed_dim=64,
                frequency_embedding_size=64)


# ------------------------------------------------------------------------------------------------
# variants: the lead adds entries here; the harness below does not change
# ------------------------------------------------------------------------------------------------
def _ours_bsa(q, k, v, grid, sel=None):
    """Our Triton kernels, default launch config, selection inside (as the DiT calls them)."""
    return bsa_attention(q, k, v, grid, grid, sparsity=SPARSITY, sel=sel)


# name -> fn(q, k, v, grid, sel=None) -> o   (see the module docstring)
BSA_VARIANTS = {
    "ours": _ours_bsa,
    "ours_raster": lambda q, k, v, grid, sel=None: bsa_attention(q, k, v, grid, grid, SPARSITY, sel=sel, layout="raster"),
    "ours_notma": lambda q, k, v, grid, sel=None: bsa_attention(q, k, v, grid, grid, SPARSITY, sel=sel,
                                                              config={"tma": False}),
    # ---- LEAD: new kernel variants here, e.g. ----
    # "ours_fwd64": lambda q, k, v, grid, sel=None: bsa_attention(
    #     q, k, v, grid, grid, SPARSITY, sel=sel, config={"fwd": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}}),
}


def _glue(model):
    from longcat_nb.speed import apply_compile

    apply_compile(model, scope="glue")


def _glue_cudnn(model):
    """As ``longcat_nb.train`` runs training: cuDNN-first SDPA on Hopper and the compiled glue."""
    from longcat_nb.speed import apply_compile, default_sdpa_preference, set_sdpa_preference

    set_sdpa_preference(default_sdpa_preference())
    apply_compile(model, scope="glue")


def _blocks(model):
    from longcat_nb.speed import apply_compile

    apply_compile(model, scope="blocks")


def _blocks_cudnn(model):
    from longcat_nb.speed import default_sdpa_preference, set_sdpa_preference

    set_sdpa_preference(default_sdpa_preference())
    _blocks(model)


def _fp8_base(model, backward=True):
    """fp8_rowwise on the block matrices of a model that may already carry peft LoRA layers."""
    from longcat_nb.memory import BIG_LINEARS, Float8RowwiseLinear

    for block in model.blocks:
        for name, mod in list(block.named_modules()):
            base = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
            if type(mod) is torch.nn.Linear and BIG_LINEARS.match(base):
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name), child, Float8RowwiseLinear.from_linear(mod, backward))


def _train_setup(model, checkpointing, fp8=False, tf32=False):
    """As longcat_nb.train runs with compile=True: cuDNN-first SDPA, the kit's checkpointing mode,
    whole compiled blocks (optionally the fp8_rowwise base). ``tf32``: the LoRA's float32 matmuls on
    TF32 tensor cores, as train.py's step runs them (here for the whole step, forward and backward;
    reset_global_state turns it back off)."""
    from longcat_nb.memory import apply_gradient_checkpointing
    from longcat_nb.speed import apply_compile, default_sdpa_preference, set_sdpa_preference

    if fp8:
        _fp8_base(model)
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_sdpa_preference(default_sdpa_preference())
    apply_gradient_checkpointing(model, checkpointing)
    apply_compile(model, scope="blocks")


def _defaults_train(model):
    """What ``longcat_nb.train`` applies with the default TrainSettings on this GPU: the checkpointing
    mode keep_attention=auto picks, compile=auto, the SDPA preference, TF32 for the LoRA's matmuls."""
    from longcat_nb.config import DatasetSettings, TrainSettings
    from longcat_nb.memory import apply_gradient_checkpointing
    from longcat_nb.speed import apply_compile, compile_wanted, default_sdpa_preference, set_sdpa_preference
    from longcat_nb.train import checkpointing_mode

    s = TrainSettings()
    torch.backends.cuda.matmul.allow_tf32 = True
    set_sdpa_preference(default_sdpa_preference())
    apply_gradient_checkpointing(model, checkpointing_mode(s, Ctx.device, DatasetSettings()))
    if compile_wanted(s.compile, Ctx.device):
        apply_compile(model, scope="blocks")


def _defaults_sample(model):
    """What 04 (sampling.load_sampling_components) applies with the default settings: the default
    attention backend, compile=auto and the SDPA preference."""
    from longcat_nb.config import ModelSettings, SampleSettings
    from longcat_nb.prepare import apply_attention, apply_compile_choice

    apply_attention(model, ModelSettings().attention, Ctx.device)
    apply_compile_choice(model, SampleSettings().compile, Ctx.device, print)


# name -> setup(model) -> None | callable   (see the module docstring)
OUR_VARIANTS = {
    "defaults": _defaults_train,
    "sample_defaults": _defaults_sample,
    "eager": lambda model: None,
    "glue": _glue,
    "glue_cudnn": _glue_cudnn,
    "blocks": _blocks,
    "blocks_cudnn": _blocks_cudnn,
    # ---- LEAD: new model variants here ----
    "blocks_full": lambda model: _train_setup(model, "full"),
    "blocks_selective": lambda model: _train_setup(model, "selective"),
    "fp8_blocks_selective": lambda model: _train_setup(model, "selective", fp8=True),
    "fp8_blocks_full": lambda model: _train_setup(model, "full", fp8=True),
    "blocks_selective_tf32": lambda model: _train_setup(model, "selective", tf32=True),
    "fp8_blocks_selective_tf32": lambda model: _train_setup(model, "selective", fp8=True, tf32=True),
    "fp8_blocks": lambda model: (_fp8_base(model, backward=False), _blocks_cudnn(model))[1],
    # 8-bit self-attention (int8 Q·Kᵀ, fp8 P·V) for sampling, with the bf16 or the fp8_rowwise base
    "q8_blocks": lambda model: (model.set_attention_backend("quant8"), _blocks_cudnn(model))[1],
    "fp8_q8_blocks": lambda model: (_fp8_base(model, backward=False), model.set_attention_backend("quant8"),
                                    _blocks_cudnn(model))[2],
}

# the official model: as its demos run it (``dit = torch.compile(dit)``), each block compiled, or eager
OFFICIAL_VARIANTS = {
    "compile": lambda model: torch.compile(model),
    # each block compiled (nn.Module.compile), under the official checkpointing: its strongest form
    "blocks": lambda model: ([b.compile() for b in model.blocks], None)[1],
    "eager": lambda model: None,
}

# which of ours each case runs unless --ours says otherwise
DEFAULT_OURS = {
    "train_dense": ["glue", "glue_cudnn"],
    "sample_dense": ["eager", "glue", "blocks", "blocks_cudnn"],
    "sample_bsa": ["eager", "glue", "blocks"],
    "sample_bsa_512": ["glue", "blocks"],
}
DEFAULT_OFFICIAL = ["compile"]
CASES = ("bsa_kernel", "train_dense", "sample_dense", "sample_bsa", "sample_bsa_512")


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
class Ctx:
    """Run-wide settings (device, dtype, sizes) filled in by main()."""

    tiny = False
    device = "cuda"
    dtype = torch.bfloat16
    repeat = 2
    warmup = 1
    depth = 48
    heads = 32
    head_dim = 128
    text_len = 512
    text_dim = 4096
    dit_cfg: dict = {}
    initial_sdpa = "auto"
    initial_tf32 = False
    results: dict = {}  # the whole report, for save()
    out = ""


def save(case=None, partial=None):
    """Write the report now (with ``partial`` as the record of ``case`` while it still runs)."""
    if not Ctx.out:
        return
    if case is not None:
        Ctx.results["cases"][case] = partial
    Path(Ctx.out).parent.mkdir(parents=True, exist_ok=True)
    Path(Ctx.out).write_text(json.dumps(Ctx.results, indent=2))


def cuda() -> bool:
    return Ctx.device == "cuda"


def sync():
    if cuda():
        torch.cuda.synchronize()


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def bench_ms(fn, rep_ms: int = 200) -> float:
    """Median milliseconds: triton.testing.do_bench on CUDA; on the CPU (--tiny) one warm-up and one run."""
    if cuda():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_extra_gib(fn) -> float | None:
    """Memory above what was allocated before ``fn``, at its peak (CUDA only)."""
    if not cuda():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return round((torch.cuda.max_memory_allocated() - base) / GIB, 3)


def kernel_profile(fn, iters: int = 3, top: int = 14) -> dict:
    """GPU time per call of each kernel ``fn`` launches (torch.profiler), largest first."""
    if not cuda():
        return {"skipped": "needs CUDA"}
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync()
    rows = {}
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0.0)
            if us:
                rows[e.key[:90]] = rows.get(e.key[:90], 0.0) + us / 1e3 / iters
    rows = dict(sorted(rows.items(), key=lambda kv: -kv[1])[:top])
    return {"total_ms": round(sum(rows.values()), 3), "kernels_ms": {k: round(v, 3) for k, v in rows.items()}}


def guard(fn):
    """Run a sub-step; an exception becomes an error record (the caller's other numbers stay)."""
    try:
        return fn()
    except Exception as e:  # report and go on
        if cuda():
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {e}"[:600], "trace": traceback.format_exc()[-2500:]}


def reset_global_state():
    """Undo what a variant may have changed: compiled glue, dynamo caches, SDPA preference."""
    from longcat_nb.models import attention as attn_mod
    from longcat_nb.speed import disable_compile

    disable_compile()
    attn_mod.set_sdpa_preference(Ctx.initial_sdpa)
    torch.backends.cuda.matmul.allow_tf32 = Ctx.initial_tf32
    torch._dynamo.reset()
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def short(r):
    """A record without tracebacks and bulky lists, for the per-case JSON line."""
    if isinstance(r, dict):
        return {k: short(v) for k, v in r.items() if k not in ("trace", "kernels_ms")}
    return r


_OFFICIAL = {}


def official():
    """The official modules (imported on first use, so TRITON_INTERPRET set by --tiny applies)."""
    if not _OFFICIAL:
        if not (OFFICIAL_ROOT / "longcat_video").is_dir():
            raise FileNotFoundError(f"no longcat_video/ under {OFFICIAL_ROOT}: set OFFICIAL_LONGCAT")
        import longcat_video.block_sparse_attention.bsa_interface as bsa
        from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel

        _OFFICIAL.update(bsa=bsa, DiT=LongCatVideoTransformer3DModel)
    return _OFFICIAL


def official_fingerprint() -> dict:
    out = {"path": str(OFFICIAL_ROOT)}
    for rel_path in ("longcat_video/block_sparse_attention/bsa_interface.py",
                     "longcat_video/block_sparse_attention/flash_attn_bsa_varlen_mask.py",
                     "longcat_video/modules/longcat_video_dit.py", "longcat_video/modules/attention.py"):
        p = OFFICIAL_ROOT / rel_path
        out[rel_path] = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None
    return out


# ------------------------------------------------------------------------------------------------
# case 1: block-sparse attention kernels
# ------------------------------------------------------------------------------------------------
def official_bsa(q, k, v, grid):
    """The official BSA exactly as its DiT's self-attention calls it (rearrangement included)."""
    return official()["bsa"].flash_attn_bsa_3d(q, k, v, tuple(grid), tuple(grid), sparsity=SPARSITY,
                                                cdf_threshold=None, chunk_3d_shape_q=list(CHUNK),
                                                chunk_3d_shape_k=list(CHUNK))


def _nblocks(grid):
    return tuple(g // c for g, c in zip(grid, CHUNK))


def official_selection(q, k, grid):
    """The official's own selection ([B, H, Mq, K] int64, blocks in (bt, by, bx) raster order, the
    same numbering as ours) and its lengths, computed by its functions on its block layout."""
    bsa = official()["bsa"]
    D, P = q.shape[-1], math.prod(CHUNK)
    qb = bsa.rearrange_THW_to_3d_block(q.detach(), *_nblocks(grid), *CHUNK, D)
    kb = bsa.rearrange_THW_to_3d_block(k.detach(), *_nblocks(grid), *CHUNK, D)
    idx, lens = bsa.get_select_indices(bsa.mean_pooling_compression(qb, P), bsa.mean_pooling_compression(kb, P),
                                       SPARSITY, None)
    return idx, lens


def official_pieces(q, k, v, do, grid, rep):
    """Milliseconds of each piece of the official call, on its block layout (no autograd)."""
    bsa = official()["bsa"]
    D, P = q.shape[-1], math.prod(CHUNK)
    nb = _nblocks(grid)
    scale = 1 / D**0.5
    qd, kd, vd = q.detach(), k.detach(), v.detach()

    def blk(x):
        return bsa.rearrange_THW_to_3d_block(x, *nb, *CHUNK, D)

    r = {}
    with torch.no_grad():
        r["rearrange_qkv_ms"] = bench_ms(lambda: (blk(qd), blk(kd), blk(vd)), rep)
        qb, kb, vb, dob = blk(qd), blk(kd), blk(vd), blk(do)

        def select():
            return bsa.get_select_indices(bsa.mean_pooling_compression(qb, P), bsa.mean_pooling_compression(kb, P),
                                          SPARSITY, None)

        r["select_ms"] = bench_ms(select, rep)
        idx, lens = select()
        r["fwd_kernel_ms"] = bench_ms(lambda: bsa.attn_fwd_bsa_varlen_triton(qb, kb, vb, scale, idx, lens, P, P,
                                                                              SPARSITY), rep)
        ob, lse = bsa.attn_fwd_bsa_varlen_triton(qb, kb, vb, scale, idx, lens, P, P, SPARSITY)
        r["unrearrange_out_ms"] = bench_ms(lambda: bsa.rearrange_3d_block_to_THW(ob, *nb, *CHUNK, D), rep)
        dq, dk, dv = torch.empty_like(qb), torch.empty_like(kb), torch.empty_like(vb)

        def bwd():
            bsa.attn_bwd_bsa_varlen_triton(dob, qb, kb, vb, ob, dq, dk, dv, scale, lse, idx, lens, P, P, SPARSITY)

        r["bwd_ms"] = bench_ms(bwd, rep)  # delta pre-pass, k * scale, selection inversion, dK/dV, dQ
        r["bwd_invert_selection_ms"] = bench_ms(
            lambda: bsa.create_indices_k_from_indices_q_varlen(idx, kb.shape[2] // P), rep)
        r["fwd_kernel_profile"] = kernel_profile(
            lambda: bsa.attn_fwd_bsa_varlen_triton(qb, kb, vb, scale, idx, lens, P, P, SPARSITY))
        r["bwd_profile"] = prof = kernel_profile(bwd)
        for key, part in (("bwd_delta_kernel_ms", "preprocess"), ("bwd_dkdv_kernel_ms", "dkdv"),
                          ("bwd_dq_kernel_ms", "_dq_")):
            hits = [ms for name, ms in prof.get("kernels_ms", {}).items() if part in name]
            if hits:
                r[key] = round(sum(hits), 3)  # from the profile (its kernels by name)
    return r


def official_kernel_blocker(rec) -> str | None:
    """Why the official kernels cannot run here, when that is the known reason (else None)."""
    err = rec.get("error", "") if isinstance(rec, dict) else ""
    if "Block pointers have been removed" in err:
        import triton

        return (f"the official kernels use tl.make_block_ptr / tl.advance, which Triton {triton.__version__} "
                "removed (its interpreter included); they need a Triton that still has block pointers, "
                "such as the GPU machine's 3.6")
    return None


_PROBE = []


def official_kernel_probe() -> str | None:
    """The known reason the official BSA kernels cannot run here (one tiny eager call), else None."""
    if not _PROBE:
        grid = next(iter(TINY_KERNEL_GRIDS.values()))
        try:
            q = torch.randn(1, 1, math.prod(grid), 16, device=Ctx.device, dtype=Ctx.dtype)
            official_bsa(q, q, q, grid)
            _PROBE.append(None)
        except Exception as e:
            _PROBE.append(official_kernel_blocker({"error": f"{type(e).__name__}: {e}"}))
    return _PROBE[0]


def our_breakdown(q, k, v, do, grid, sel, rep):
    """Our default kernels piece by piece (as benchmarks/bench_bsa.py ``breakdown``)."""
    from longcat_nb.models.bsa import select_blocks
    from longcat_nb.models.bsa import triton_bsa as tb

    qd, kd, vd = q.detach(), k.detach(), v.detach()
    r = {"select_ms": bench_ms(lambda: select_blocks(qd, kd, grid, grid, SPARSITY), rep)}
    plan = tb.make_plan(qd, kd, grid, grid, sel=sel)
    r["invert_selection_ms"] = bench_ms(lambda: tb.invert_selection(plan.sel, plan.nsel, plan.mk), rep)
    plan.inverse()
    o, lse = tb.launch_fwd(plan, qd, kd, vd)
    _, delta = tb.launch_dq(plan, qd, kd, vd, o, do, lse)
    r["fwd_kernel_ms"] = bench_ms(lambda: tb.launch_fwd(plan, qd, kd, vd), rep)
    r["dq_kernel_ms"] = bench_ms(lambda: tb.launch_dq(plan, qd, kd, vd, o, do, lse), rep)
    r["dkdv_kernel_ms"] = bench_ms(lambda: tb.launch_dkdv(plan, qd, kd, vd, do, lse, delta), rep)
    return r


def check_vs_reference(fn, q, k, v, do, grid, sel_ref, heads):
    """fn(q, k, v) -> o on every head; the fp32 torch reference with selection ``sel_ref`` on ``heads``."""
    from longcat_nb.models.bsa import reference_bsa_attention

    o = fn(q, k, v)
    g = torch.autograd.grad(o, (q, k, v), do)
    hs = sorted({h % q.shape[1] for h in heads})
    sub = [t.detach()[:, hs].float().contiguous().requires_grad_(True) for t in (q, k, v)]
    r = reference_bsa_attention(*sub, grid, grid, sel=sel_ref[:, hs])
    gr = torch.autograd.grad(r, sub, do[:, hs].float())
    out = {"heads_checked": hs, "out_rel_err": rel(o[:, hs], r)}
    for name, a, b in zip(("dq", "dk", "dv"), g, gr):
        out[f"{name}_rel_err"] = rel(a[:, hs], b)
    return out, o.detach()


def selection_overlap(a, b, mk) -> float:
    """Mean fraction of the kept key blocks that two top-k selections share, per query block."""
    ma = torch.zeros(*a.shape[:3], mk, dtype=torch.bool, device=a.device).scatter_(-1, a, True)
    mb = torch.zeros(*b.shape[:3], mk, dtype=torch.bool, device=b.device).scatter_(-1, b, True)
    return float(((ma & mb).sum(-1).float() / a.shape[-1]).mean())


def time_attention(fn, q, k, v, do, rep):
    r = {}
    with torch.no_grad():
        r["fwd_ms"] = bench_ms(lambda: fn(q, k, v), rep)
    r["fwd_bwd_ms"] = bench_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), rep)
    r["fwd_bwd_peak_extra_gib"] = peak_extra_gib(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    r["fwd_bwd_profile"] = kernel_profile(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    return r


def kernel_grid_case(grid, variants, rep, heads):
    from longcat_nb.models.bsa import select_blocks
    from longcat_nb.models.bsa.reference import num_blocks, num_selected

    H, D = Ctx.heads, Ctx.head_dim
    n = math.prod(grid)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, device=Ctx.device, dtype=Ctx.dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(1, H, n, D, device=Ctx.device, dtype=Ctx.dtype)
    mk = num_blocks(grid, CHUNK)
    r = {"grid": list(grid), "tokens": n, "heads": H, "head_dim": D, "dtype": str(Ctx.dtype).replace("torch.", ""),
         "key_blocks": mk, "kept_blocks_ours": num_selected(mk, SPARSITY),
         "kept_blocks_official": int((1 - SPARSITY) * mk)}
    sel_ours = select_blocks(q.detach(), k.detach(), grid, grid, SPARSITY)
    outs = {}

    # -- official -----------------------------------------------------------------------------------
    sel_off = []

    def run_selection():  # torch only (its torch.compile'd pooling and top-k): runs where the kernels do not
        sel_off.append(official_selection(q, k, grid)[0])
        return {"kept_blocks": int(sel_off[0].shape[-1]),
                "overlap_with_ours": selection_overlap(sel_off[0], sel_ours, mk)}

    r["official_selection"] = guard(run_selection)

    def run_official():
        o = {}
        o.update(time_attention(lambda a, b, c: official_bsa(a, b, c, grid), q, k, v, do, rep))
        o["pieces"] = guard(lambda: official_pieces(q, k, v, do, grid, rep))
        if sel_off:
            err, outs["official"] = check_vs_reference(lambda a, b, c: official_bsa(a, b, c, grid), q, k, v, do,
                                                       grid, sel_off[0], heads)
            o["errors_vs_reference_own_selection"] = err
        return o

    r["official"] = guard(run_official)
    blocker = official_kernel_blocker(r["official"])
    if blocker:
        r["official"] = {"skipped": blocker, "error_seen": r["official"]["error"][:200]}

    # -- ours ---------------------------------------------------------------------------------------
    r["ours"] = {}
    for name, fn in variants.items():
        def run_ours(fn=fn, name=name):
            o = time_attention(lambda a, b, c: fn(a, b, c, grid), q, k, v, do, rep)
            takes_sel = "sel" in inspect.signature(fn).parameters
            call = (lambda a, b, c: fn(a, b, c, grid, sel=sel_ours)) if takes_sel else (lambda a, b, c: fn(a, b, c, grid))
            err, outs[name] = check_vs_reference(call, q, k, v, do, grid, sel_ours, heads)
            err["selection"] = "select_blocks (same as the reference)" if takes_sel else "its own (no sel parameter)"
            o["errors_vs_reference"] = err
            if "official" in outs:
                o["out_rel_diff_vs_official"] = rel(outs[name], outs["official"])
            off = r["official"]
            for key in ("fwd_ms", "fwd_bwd_ms"):
                if isinstance(off, dict) and off.get(key):
                    o[f"ratio_ours_over_official_{key[:-3]}"] = round(o[key] / off[key], 4)
            return o

        r["ours"][name] = guard(run_ours)
        outs.pop(name, None)
    r["ours_default_breakdown"] = guard(lambda: our_breakdown(q, k, v, do, grid, sel_ours, rep))
    return r


def case_bsa_kernel(args):
    grids = TINY_KERNEL_GRIDS if Ctx.tiny else {g: KERNEL_GRIDS[g] for g in args.grids.split(",")}
    variants = {n: BSA_VARIANTS[n] for n in (args.bsa_variants.split(",") if args.bsa_variants else BSA_VARIANTS)}
    res = {"sparsity": SPARSITY, "chunk": list(CHUNK),
           "official_call": "bsa_interface.flash_attn_bsa_3d (as modules/attention.py Attention._process_attn)",
           "ours_variants": list(variants)}
    if not cuda():
        res["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    from longcat_nb.models.bsa import triton_bsa as tb

    res["ours_default_config"] = tb.DEFAULT_CONFIG
    for label, grid in grids.items():
        t0 = time.perf_counter()
        res[label] = guard(lambda grid=grid: kernel_grid_case(grid, variants, 200 if label.startswith("704") else 150,
                                                              heads=(5, 21) if cuda() else (0, 1)))
        res[label]["wall_s"] = round(time.perf_counter() - t0, 1)
        save("bsa_kernel", res)
        print(f"# bsa_kernel {label} done in {res[label]['wall_s']} s", file=sys.stderr, flush=True)
        if cuda():
            torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------------
# the DiT: identical random weights for both implementations
# ------------------------------------------------------------------------------------------------
def _seed_of(name: str, seed: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_init_(model, seed: int = 0):
    """Small random weights, each tensor from its own generator seeded by its name, so two models with
    the same state-dict keys get the same values whatever their parameter order (as bench_dit.py's
    random_full_dit: norms 1, other vectors 0, matrices N(0, 1/fan_in))."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                g = torch.Generator(device=p.device).manual_seed(_seed_of(name, seed))
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)


def build_dit(kind: str):
    """The DiT (official or ours) built on the device in the working dtype, without an fp32 copy."""
    if kind == "official":
        cls = official()["DiT"]
        kw = dict(enable_flashattn2=True, cp_split_hw=[1, 1], text_tokens_zero_pad=True, bsa_params=dict(BSA_PARAMS))
    else:
        from longcat_nb.models import LongCatVideoTransformer3DModel as cls

        kw = dict(text_tokens_zero_pad=True, bsa_params=dict(BSA_PARAMS))
    cfg = dict(Ctx.dit_cfg, depth=Ctx.depth)
    with torch.device("meta"):
        m = cls(**kw, **cfg)
    m = m.to(Ctx.dtype).to_empty(device=Ctx.device)
    random_init_(m)
    return m.eval().requires_grad_(False)


def add_lora_to(kind, model):
    """Rank-32 LoRA on the five attention targets; the same LoRA weights on both models afterwards."""
    from longcat_nb.lora import add_lora, resolve_target_modules

    if kind == "official":
        from peft import LoraConfig, inject_adapter_in_model

        names = resolve_target_modules(model, TARGETS)  # exact names (peft would match suffixes)
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names, init_lora_weights=True),
                                model)
    else:
        add_lora(model, rank=RANK, alpha=RANK, targets=TARGETS)
    params = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            lora = ".lora_A." in name or ".lora_B." in name
            p.requires_grad_(lora)
            if not lora:
                continue
            p.data = p.data.float()  # trainable weights and their optimizer state in fp32 (as train.py)
            if ".lora_A." in name:
                g = torch.Generator(device=p.device).manual_seed(_seed_of(name, 7))
                bound = p.shape[1] ** -0.5
                p.uniform_(-bound, bound, generator=g)
            else:
                p.zero_()
            params.append(p)
    return params


def dit_inputs(batch: int, latent, seed: int = 1):
    """Latents [B, 16, T, H, W] fp32, text [B, 1, L, C], mask [B, L]: a 1-token negative prompt and
    a 120-token positive one (what CFG sampling feeds); training uses the positive one."""
    g = torch.Generator(device=Ctx.device).manual_seed(seed)
    x = torch.randn(1, 16, *latent, device=Ctx.device, generator=g).expand(batch, -1, -1, -1, -1).contiguous()
    y = torch.randn(batch, 1, Ctx.text_len, Ctx.text_dim, device=Ctx.device, generator=g).to(Ctx.dtype)
    mask = torch.zeros(batch, Ctx.text_len, dtype=torch.long, device=Ctx.device)
    mask[:, : min(120, Ctx.text_len)] = 1
    if batch == 2:
        mask[0] = 0
        mask[0, 0] = 1
    return x, y, mask


def mem_gib(fn_name):
    return round(getattr(torch.cuda, fn_name)() / GIB, 2) if cuda() else None


def timed_steps(step, n_warm, n_timed) -> dict:
    """Run n_warm + n_timed steps (each synchronized); the first one includes compilation. Peak memory
    of the warm-up steps and of the timed steps, separately."""
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    times, warm_peak = [], None
    for _ in range(n_warm + n_timed):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) == n_warm and cuda():
            warm_peak = mem_gib("max_memory_allocated")
            torch.cuda.reset_peak_memory_stats()
    timed = times[n_warm:]
    med = statistics.median(timed) if timed else None
    return {"sec_per_step": round(med, 4) if timed else None, "times": [round(t, 3) for t in times],
            "warmup_steps": n_warm, "first_step_s": round(times[0], 2) if times else None,
            "compile_s_estimate": round(times[0] - med, 2) if timed and n_warm else None,
            "peak_gib": mem_gib("max_memory_allocated"), "peak_warmup_gib": warm_peak}


def _apply_setup(setup, model):
    fn = setup(model)  # not ``or``: a compiled wrapper has no truth value (it raises on len())
    return model if fn is None else fn


def run_train(kind, setup, latent):
    model = build_dit(kind)
    rec = {"resident_after_build_gib": mem_gib("memory_allocated")}
    params = add_lora_to(kind, model)
    rec["lora_params_m"] = round(sum(p.numel() for p in params) / 1e6, 3)
    model.enable_gradient_checkpointing()
    model.train()
    fn = _apply_setup(setup, model)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    from longcat_nb.train import flow_matching_loss

    x0, y, mask = dit_inputs(1, latent)
    g = torch.Generator(device=Ctx.device).manual_seed(2)
    noise = torch.randn(x0.shape, device=Ctx.device, generator=g)
    sigma = torch.tensor([0.7], device=Ctx.device)
    losses = []

    def step():
        loss = flow_matching_loss(fn, x0, y, mask, sigma, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    rec["resident_gib"] = mem_gib("memory_allocated")
    rec.update(timed_steps(step, Ctx.warmup, Ctx.repeat))
    rec["losses"] = [round(x, 6) for x in losses]
    rec["losses_finite"] = all(math.isfinite(x) for x in losses)
    return rec


def run_sample(kind, setup, latent, bsa):
    model = build_dit(kind)
    rec = {"resident_gib": mem_gib("memory_allocated")}
    if bsa:
        if kind == "official":
            model.enable_bsa()
        else:
            rec["attention_backend"] = model.set_attention_backend("bsa")
            if not cuda():
                rec["note"] = "on the CPU our DiT's bsa backend falls back to dense SDPA"
    fn = _apply_setup(setup, model)
    x, y, mask = dit_inputs(2, latent)
    t = torch.full((2,), 998.0, device=Ctx.device)
    out = []

    def step():
        out[:] = [fn(x, t, y, mask)]

    with torch.no_grad():
        rec.update(timed_steps(step, Ctx.warmup, Ctx.repeat))
    o = out[0].detach().float()
    rec["finite"] = bool(torch.isfinite(o).all())
    return rec, o


def _variant_sets(case, args):
    off = DEFAULT_OFFICIAL if args.official is None else [n for n in args.official.split(",") if n and n != "none"]
    ours = DEFAULT_OURS[case] if args.ours is None else [n for n in args.ours.split(",") if n and n != "none"]
    for n in off:
        if n not in OFFICIAL_VARIANTS:
            raise KeyError(f"official variant {n!r}: known {sorted(OFFICIAL_VARIANTS)}")
    for n in ours:
        if n not in OUR_VARIANTS:
            raise KeyError(f"our variant {n!r}: known {sorted(OUR_VARIANTS)}")
    return off, ours


def dit_case(case, args):
    """train_dense / sample_dense / sample_bsa / sample_bsa_512: official variants first, then ours."""
    latents = TINY_DIT_LATENTS if Ctx.tiny else DIT_LATENTS
    shape = "512x896x93" if case == "sample_bsa_512" else "480x832x93"
    latent = latents[shape]
    bsa = case.startswith("sample_bsa")
    off_names, our_names = _variant_sets(case, args)
    res = {"shape": shape + (" (tiny stand-in)" if Ctx.tiny else ""), "latent": [16, *latent],
           "tokens": latent[0] * (latent[1] // 2) * (latent[2] // 2), "text_tokens": Ctx.text_len,
           "depth": Ctx.depth, "dtype": str(Ctx.dtype).replace("torch.", ""),
           "attention": "bsa" if bsa else "dense", "official": {}, "ours": {}}
    if case.startswith("train"):
        res.update(lora_rank=RANK, lora_targets=list(TARGETS), optimizer="AdamW lr 1e-4",
                   gradient_checkpointing=True, batch=1)
    else:
        res.update(batch=2, timestep=998.0)
    if case == "sample_bsa":
        res["official_bsa_at_480x832"] = official_bsa_480_fact()
        off_names = []  # it cannot run: recorded above
    res["official_notes"] = (("self-attention: its BSA kernels (flash_attn_bsa_3d)" if bsa else
                              "self-attention: the flash_attn shim (torch SDPA, torch's kernel choice)")
                             + "; cross-attention: the shim's varlen call, one batched SDPA (equal lengths under "
                               "text_tokens_zero_pad)")
    if bsa and off_names:
        blocker = official_kernel_probe()
        if blocker:
            res["official_skipped"] = blocker
            off_names = []
    ref = None
    for name in off_names:
        print(f"# {case} official:{name}", file=sys.stderr, flush=True)

        def one(name=name):
            nonlocal ref
            if case.startswith("train"):
                return run_train("official", OFFICIAL_VARIANTS[name], latent)
            rec, o = run_sample("official", OFFICIAL_VARIANTS[name], latent, bsa)
            if ref is None:
                ref = o
            return rec

        res["official"][name] = guard(one)
        blocker = official_kernel_blocker(res["official"][name])
        if blocker:
            res["official"][name] = {"skipped": blocker, "error_seen": res["official"][name]["error"][:200]}
        reset_global_state()
        save(case, res)
        print(f"# {json.dumps(short(res['official'][name]))}", file=sys.stderr, flush=True)
    base = next((v["sec_per_step"] for v in res["official"].values() if v.get("sec_per_step")), None)
    base_name = next((n for n, v in res["official"].items() if v.get("sec_per_step")), None)
    for name in our_names:
        print(f"# {case} ours:{name}", file=sys.stderr, flush=True)

        def one(name=name):
            if case.startswith("train"):
                rec = run_train("ours", OUR_VARIANTS[name], latent)
            else:
                rec, o = run_sample("ours", OUR_VARIANTS[name], latent, bsa)
                if ref is not None:
                    rec["out_rel_diff_vs_official"] = rel(o, ref)
            if base and rec.get("sec_per_step"):
                rec[f"ratio_ours_over_official_{base_name}"] = round(rec["sec_per_step"] / base, 4)
            return rec

        res["ours"][name] = guard(one)
        reset_global_state()
        save(case, res)
        print(f"# {json.dumps(short(res['ours'][name]))}", file=sys.stderr, flush=True)
    if case.startswith("train"):
        first = {f"official:{n}": v["losses"][0] for n, v in res["official"].items() if v.get("losses")}
        first.update({f"ours:{n}": v["losses"][0] for n, v in res["ours"].items() if v.get("losses")})
        res["first_step_losses"] = first
    return res


def official_bsa_480_fact():
    """Call the official BSA on a 480x832 grid (24x30x52) with one head and record what it says."""
    grid = DIT_LATENTS["480x832x93"][0], DIT_LATENTS["480x832x93"][1] // 2, DIT_LATENTS["480x832x93"][2] // 2
    fact = {"grid": list(grid), "chunk": list(CHUNK), "runs": False}
    try:
        q = torch.zeros(1, 1, math.prod(grid), 64, device=Ctx.device, dtype=Ctx.dtype)
        official_bsa(q, q, q, grid)
        fact["runs"] = True  # would be news
    except AssertionError:
        tb = traceback.extract_tb(sys.exc_info()[2])[-1]
        fact["reason"] = (f"AssertionError in {Path(tb.filename).name}:{tb.lineno}: `{tb.line}` "
                          f"(30 = 480 / 16 is not divisible by 4)")
    except Exception as e:
        fact["reason"] = f"{type(e).__name__}: {e}"[:300]
    return fact


# ------------------------------------------------------------------------------------------------
# main: cases, JSON, table
# ------------------------------------------------------------------------------------------------
def table(res):
    lines = ["", f"{'case':34s} {'impl':24s} {'time':>12s} {'ours/off':>9s} {'peak GiB':>9s}  notes"]
    for case, r in res["cases"].items():
        if "error" in r:
            lines.append(f"{case:34s} {'-':24s} {'':>12s} {'':>9s} {'':>9s}  {r['error'][:70]}")
            continue
        if case == "bsa_kernel":
            for label, g in r.items():
                if not isinstance(g, dict) or "tokens" not in g and "error" not in g:
                    continue
                if "error" in g:
                    lines.append(f"{'bsa ' + label:34s} {'-':24s} {'':>12s} {'':>9s} {'':>9s}  {g['error'][:70]}")
                    continue
                sel = g.get("official_selection", {})
                if "overlap_with_ours" in sel:
                    lines.append(f"{'bsa ' + label:34s} {'selection':24s} {'':>12s} {'':>9s} {'':>9s}  official vs "
                                 f"ours: {sel['overlap_with_ours']:.3f} of kept blocks shared")
                pieces = g.get("official", {}).get("pieces", {})
                keys = ("select_ms", "fwd_kernel_ms", "bwd_ms", "bwd_invert_selection_ms", "bwd_dkdv_kernel_ms",
                        "bwd_dq_kernel_ms", "rearrange_qkv_ms")
                if any(k in pieces for k in keys):
                    lines.append(f"{'bsa ' + label:34s} {'official pieces':24s} " + ", ".join(
                        f"{k[:-3]} {pieces[k]:.2f}" for k in keys if k in pieces) + " (ms)")
                bd = g.get("ours_default_breakdown", {})
                keys = ("select_ms", "invert_selection_ms", "fwd_kernel_ms", "dq_kernel_ms", "dkdv_kernel_ms")
                if any(k in bd for k in keys):
                    lines.append(f"{'bsa ' + label:34s} {'ours pieces (default)':24s} " + ", ".join(
                        f"{k[:-3]} {bd[k]:.2f}" for k in keys if k in bd) + " (ms)")
                rows = [("official", g.get("official", {}))] + [(n, v) for n, v in g.get("ours", {}).items()]
                for name, v in rows:
                    for key in ("fwd", "fwd_bwd"):
                        if "error" in v or "skipped" in v:
                            if key == "fwd":
                                why = ("skipped: " + v["skipped"]) if "skipped" in v else v["error"]
                                lines.append(f"{'bsa ' + label:34s} {name:24s} {'':>12s} {'':>9s} {'':>9s}  "
                                             f"{why}"[:180])
                            continue
                        ms = v.get(f"{key}_ms")
                        ratio = v.get(f"ratio_ours_over_official_{key}")
                        err = v.get("errors_vs_reference") or v.get("errors_vs_reference_own_selection") or {}
                        errs = [x for kk, x in err.items() if kk.endswith("rel_err")]
                        note = f"max rel err {max(errs):.1e}" if errs and key == "fwd_bwd" else ""
                        peak = v.get("fwd_bwd_peak_extra_gib") if key == "fwd_bwd" else None
                        lines.append(f"{'bsa ' + label + ' ' + key:34s} {name:24s} "
                                     f"{(f'{ms:.2f} ms' if ms is not None else '-'):>12s} "
                                     f"{(f'{ratio:.3f}' if ratio else ''):>9s} "
                                     f"{(f'{peak:.2f}' if peak is not None else ''):>9s}  {note}")
            continue
        rows = [(f"official:{n}", v) for n, v in r.get("official", {}).items()]
        rows += [(f"ours:{n}", v) for n, v in r.get("ours", {}).items()]
        if case == "sample_bsa" and "official_bsa_at_480x832" in r:
            lines.append(f"{case:34s} {'official':24s} {'-':>12s} {'':>9s} {'':>9s}  cannot run: "
                         f"{r['official_bsa_at_480x832'].get('reason', '')[:60]}")
        if r.get("official_skipped"):
            lines.append(f"{case:34s} {'official':24s} {'-':>12s} {'':>9s} {'':>9s}  skipped: "
                         f"{r['official_skipped'][:70]}")
        for name, v in rows:
            if "error" in v or "skipped" in v:
                lines.append(f"{case:34s} {name:24s} {'':>12s} {'':>9s} {'':>9s}  "
                             f"{('skipped: ' + v['skipped']) if 'skipped' in v else v['error']}"[:180])
                continue
            ratio = next((x for kk, x in v.items() if kk.startswith("ratio_ours_over_official")), None)
            notes = []
            if v.get("losses"):
                notes.append("loss " + " ".join(f"{x:.4f}" for x in v["losses"]))
            if v.get("out_rel_diff_vs_official") is not None:
                notes.append(f"rel diff vs official {v['out_rel_diff_vs_official']:.2e}")
            if v.get("first_step_s") is not None:
                notes.append(f"first step {v['first_step_s']:.1f} s")
            sec = v.get("sec_per_step")
            peak = v.get("peak_gib")
            lines.append(f"{case:34s} {name:24s} {(f'{sec:.3f} s' if sec else '-'):>12s} "
                         f"{(f'{ratio:.3f}' if ratio else ''):>9s} {(f'{peak:.1f}' if peak else ''):>9s}  "
                         + "; ".join(notes))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--repeat", type=int, default=2, help="timed DiT steps (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed DiT steps first (the first one compiles)")
    ap.add_argument("--depth", type=int, default=None, help="DiT blocks (default 48; 2 with --tiny)")
    ap.add_argument("--official", default=None, help=f"official variants, comma list of {sorted(OFFICIAL_VARIANTS)} "
                                                     f"or none (default {DEFAULT_OFFICIAL})")
    ap.add_argument("--ours", default=None, help=f"our model variants, comma list of {sorted(OUR_VARIANTS)} "
                                                 f"(default per case: {DEFAULT_OURS})")
    ap.add_argument("--bsa-variants", default=None, help=f"bsa_kernel: which of {sorted(BSA_VARIANTS)} (default all)")
    ap.add_argument("--grids", default=",".join(KERNEL_GRIDS), help=f"bsa_kernel grids: {', '.join(KERNEL_GRIDS)}")
    ap.add_argument("--tiny", action="store_true", help="small model and shapes (the CPU plumbing check)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "official.json"))
    args = ap.parse_args(argv)

    Ctx.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not cuda():  # the official's amp.autocast(device_type="cuda") on every block
        warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported")
    if not cuda() and not args.tiny:
        print(json.dumps({"error": "needs a CUDA GPU (or --tiny)"}))
        return 1
    Ctx.tiny = args.tiny
    if not cuda():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton kernels
    Ctx.dtype = torch.bfloat16 if cuda() else torch.float32
    Ctx.repeat, Ctx.warmup = args.repeat, args.warmup
    if args.tiny:
        Ctx.depth = args.depth or TINY_DIT["depth"]
        Ctx.heads, Ctx.head_dim = 2, 32
        Ctx.text_len, Ctx.text_dim = 16, TINY_DIT["caption_channels"]
        Ctx.dit_cfg = {k: v for k, v in TINY_DIT.items() if k != "depth"}
    else:
        Ctx.depth = args.depth or 48
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    from longcat_nb.models import attention as attn_mod

    Ctx.initial_sdpa = attn_mod.sdpa_preference()
    Ctx.initial_tf32 = torch.backends.cuda.matmul.allow_tf32
    import diffusers
    import peft

    res = {"benchmark": "official_vs_ours",
           "device": torch.cuda.get_device_name() if cuda() else "cpu", "tiny": args.tiny,
           "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
           "peft": peft.__version__, "repeat": args.repeat, "warmup": args.warmup, "depth": Ctx.depth,
           "official": official_fingerprint(), "cases": {}}
    Ctx.results, Ctx.out = res, args.out
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    try:
        official()
        res["official"]["dynamo_cache_size_limit_after_import"] = torch._dynamo.config.cache_size_limit
    except Exception as e:
        res["official"]["import_error"] = f"{type(e).__name__}: {e}"[:400]
    t_all = time.perf_counter()
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        t0 = time.perf_counter()
        try:
            if case == "bsa_kernel":
                r = case_bsa_kernel(args)
            elif case in CASES:
                r = dit_case(case, args)
            else:
                r = {"error": f"unknown case {case!r}: choose from {', '.join(CASES)}"}
        except Exception as e:  # report and go on
            r = {"error": f"{type(e).__name__}: {e}"[:600], "trace": traceback.format_exc()[-2500:]}
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        res["cases"][case] = r
        print(json.dumps({case: short(r)}), flush=True)
        reset_global_state()
        save()  # after every case (and every variant inside one), so a run cut short leaves what finished
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    save()
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
