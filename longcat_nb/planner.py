"""VRAM planner: predict peak GPU memory and host RAM from the settings, before anything loads.

The model is counted from the architecture (weights per block in each precision, LoRA parameters
from the targets and rank) plus activation terms in units of one [tokens, 4096] bf16 tensor, with
coefficients calibrated on the H100 measurements in docs/benchmarks.md (full-size DiT, 480x832x93).
``suggest`` walks the memory options from cheapest (in step time) to dearest and returns the first
setting that fits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from .config import DEFAULT_TARGETS, QUANTIZED

GIB = 2**30

# Full-size architecture (spec §2.3/2.4)
C = 4096
DEPTH = 48
BLOCK_PARAMS = 282_132_992
BIG_LINEAR_PARAMS = 269_516_800  # qkv, attn.proj, cross q/kv/proj, ffn w1/w2/w3 (weights + biases)
TOP_PARAMS = 38_687_808
TARGET_SHAPES = {  # (in, out) of each LoRA target
    "attn.qkv": (4096, 12288), "attn.proj": (4096, 4096), "cross_attn.q_linear": (4096, 4096),
    "cross_attn.kv_linear": (4096, 8192), "cross_attn.proj": (4096, 4096),
    "ffn.w1": (4096, 11008), "ffn.w2": (11008, 4096), "ffn.w3": (4096, 11008),
    "adaLN_modulation.1": (512, 24576),
}
# UMT5-XXL encoder (spec §1.5: d_model 4096, 24 layers, d_ff 10240, vocab 256384), counted [D]
TEXT_ENCODER_PARAMS = 5_680_910_336
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5, "nf4": 0.5,
                "fp8_rowwise": 1.0}

# Calibration (H100, torch 2.11, cuDNN attention), in units of one [N, 4096] bf16 tensor:
K_TRAIN_BLOCK = 50.0  # one block's recompute + backward working set (measured 14.4 GiB at N=37,440)
# with whole blocks compiled (speed.apply_compile's "blocks", the default): 9.48 GiB at N=37,440, an int8
# base with activation offload (24.28 GiB peak, 13.58 resident, 1.22 LoRA + AdamW; H100, run 25). The fp32
# glue alone compiled gave 42 (51.6 vs 53.9 GiB, run 5).
K_TRAIN_BLOCK_COMPILED = 33.2
K_SAMPLE = 15.4  # inference working set per token row (8.8 GiB for CFG batch 2 at N=37,440)
K_SAMPLE_COMPILED = 9.2  # with compiled blocks (H200, docs/benchmarks.md: 30.6 GiB bf16, 18.9 GiB fp8_rowwise)
OPTIMIZER_BYTES = {"adamw": 16.0, "adamw8bit": 10.0, "prodigy": 24.0}  # per LoRA param: w, g, states
CONTEXT_GIB = 0.0  # max_memory_allocated excludes the CUDA context; keep predictions comparable
# Host RAM besides weights: Python, torch + Inductor, CUDA's host side. Training (its cache reader too):
# 6.11 GiB measured at full size. Sampling, beside the text encoder it keeps there: 13.0 GiB, 10.6 of it UMT5.
HOST_BASE_GIB = 6.0
HOST_BASE_SAMPLE_GIB = 2.5
# Sampling with swapped bf16 blocks holds more beside the DiT while it loads and pins them: peaks of 28.76 and
# 30.61 GiB with 24 and 36 blocks swapped, 3.6 and 5.4 GiB beside the 25.2 GiB bf16 DiT (H100,
# docs/benchmarks.md run 29), where HOST_BASE_SAMPLE_GIB counts 2.5
HOST_SAMPLE_SWAP_GIB = 2.0
# The host RAM a 16 or 24 GiB card's machine is planned for (the card presets, the e2e card runs): 32 GiB
# machines are common there, and a machine with more still gets settings that run well.
SMALL_CARD_HOST_GIB = 32.0
SMALL_CARD_GIB = 40.0  # cards below this are planned within SMALL_CARD_HOST_GIB of host RAM
SWAP_STEPS = tuple(range(4, DEPTH, 4))  # the block-swap counts suggest() tries, fewest first
NOT_SWAPPED = ("nf4",)  # bitsandbytes keeps the quantization state on the GPU: block swap leaves it
# optimum-quanto's int4 (TinyGemm packing on CUDA) fails inside Inductor (H100, torch 2.11, quanto 0.2.7:
# BackendCompilerFailed, no attribute '_scale'), so its blocks run eagerly (prepare.apply_compile_choice says so)
NOT_COMPILED = ("int4",)


@dataclass
class PlanSettings:
    height: int = 480
    width: int = 832
    num_frames: int = 93
    batch_size: int = 1
    batch_tokens: int = 0  # per-bucket batches of up to this many tokens (train.batch_tokens)
    rank: int = 32
    targets: tuple = DEFAULT_TARGETS
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    activation_offload: bool = False
    blocks_to_swap: int = 0
    optimizer: str = "adamw"
    compile: bool = False
    selective: bool = False  # checkpointing also keeps the self-attention outputs (no attention recompute)
    mode: str = "train"  # train | sample
    cfg: bool = True  # sampling with guidance runs batch 2
    adapter: str = "lora"  # config.ADAPTERS: the trainable parameters counted (lora_params)


@dataclass
class Plan:
    peak_gib: float
    host_ram_gib: float
    parts: dict


def tokens(s: PlanSettings) -> int:
    T = 1 + (s.num_frames - 1) // 4
    return T * (s.height // 16) * (s.width // 16)


def clips_per_batch(clip_tokens: int, batch_size: int, batch_tokens: int = 0) -> int:
    """Clips in one batch of clips of ``clip_tokens``: ``batch_size``, or with ``batch_tokens`` > 0 as many
    as fit that many tokens, never fewer than batch_size (train.batch_tokens)."""
    return max(batch_size, batch_tokens // clip_tokens) if batch_tokens else batch_size


def block_bytes(precision: str, train: bool = False) -> float:
    if precision in QUANTIZED:
        rest = BLOCK_PARAMS - BIG_LINEAR_PARAMS
        per = WEIGHT_BYTES[precision] * (2 if precision == "fp8_rowwise" and train else 1)  # + transposed copy
        return BIG_LINEAR_PARAMS * per + rest * 2.0
    return BLOCK_PARAMS * WEIGHT_BYTES.get(precision, 2.0)


def text_encoder_bytes(precision: str = "bf16") -> float:
    """Weights of the text encoder on the GPU while the prompts are encoded (sampling only: training
    reads cached embeddings)."""
    return TEXT_ENCODER_PARAMS * WEIGHT_BYTES.get(precision, 2.0)


def lora_params(rank: int, targets, adapter: str = "lora") -> int:
    """Trainable parameters of the adapter (config.ADAPTERS) on the block targets, as peft builds them."""
    return DEPTH * sum(_adapter_params(adapter, rank, i, o) for i, o in (TARGET_SHAPES[t] for t in targets))


def _adapter_params(adapter: str, r: int, i: int, o: int) -> int:
    if adapter == "dora":  # + the magnitude of each output row
        return r * (i + o) + o
    if adapter == "loha":  # two rank-r products
        return 2 * r * (i + o)
    if adapter == "lokr":  # w1 whole; w2 = w2_a·w2_b below peft's threshold, else whole (peft's LoKr defaults)
        (o1, o2), (i1, i2) = _factorization(o), _factorization(i)
        return o1 * i1 + (r * (o2 + i2) if r < max(o2, i2) / 2 else o2 * i2)
    return r * (i + o)


def _factorization(n: int) -> tuple[int, int]:
    """peft's LoKr split of a dimension (lokr.layer.factorization, factor -1): the divisor pair m <= n/m
    with the smallest sum; restated here because the planner imports without torch."""
    m = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return m, n // m


def compiles(s: PlanSettings) -> bool:
    """Whether these settings' blocks run compiled: compile asked for and a base precision that compiles."""
    return s.compile and s.precision not in NOT_COMPILED


def plan(s: PlanSettings) -> Plan:
    n = max(tokens(s) * s.batch_size, s.batch_tokens)  # the largest batch a bucket gets
    unit = n * C * 2  # one [N, C] bf16 tensor
    swap = max(0, min(s.blocks_to_swap, DEPTH))
    # Block swap moves plain weights and the inner tensors of quanto's and torchao's quantized ones;
    # bitsandbytes' nf4 keeps its quantization state on the GPU, so its blocks stay.
    swap_effective = swap if s.precision not in NOT_SWAPPED else 0
    compiled = compiles(s)
    blk = block_bytes(s.precision, train=s.mode == "train")
    parts = {
        "weights_resident": (DEPTH - swap_effective) * blk + TOP_PARAMS * 2.0,
        "swap_buffers": 2 * blk if swap_effective else 0.0,
    }
    if s.mode == "sample":
        rows = n * (2 if s.cfg else 1)
        parts["activations"] = (K_SAMPLE_COMPILED if compiled else K_SAMPLE) * rows * C * 2
    else:
        p = lora_params(s.rank, s.targets, s.adapter)
        parts["lora_and_optimizer"] = p * OPTIMIZER_BYTES.get(s.optimizer, 16.0)
        if s.gradient_checkpointing or s.activation_offload:
            parts["saved_block_inputs"] = 0.0 if s.activation_offload else DEPTH * unit
            parts["block_working_set"] = (K_TRAIN_BLOCK_COMPILED if compiled else K_TRAIN_BLOCK) * unit
            if s.selective and not s.activation_offload:
                parts["saved_attention"] = DEPTH * unit  # one [N, 4096] output (+ its lse) per block
        else:
            parts["all_activations"] = DEPTH * K_TRAIN_BLOCK * unit
    peak = sum(parts.values()) / GIB + CONTEXT_GIB
    # Host RAM has two phases and its peak is the larger one, not their sum. Loading: where a bf16 model is
    # swapped, its weights pass through host memory and the pinned copy of the swapped blocks replaces it
    # block by block (a whole bf16 DiT goes straight to the GPU a shard at a time; a quantized one a block
    # at a time, quantized as it loads, model_files.load_dit's each_block, swapped or not, in training).
    # Running: the swapped blocks' pinned weights, plus the offloaded block inputs while training.
    quantized_load = s.precision in QUANTIZED and s.mode == "train"
    loading = DEPTH * block_bytes("bf16") if swap and not quantized_load else 0.0
    loading += HOST_SAMPLE_SWAP_GIB * GIB if loading and s.mode == "sample" else 0.0
    running = swap_effective * blk
    running += DEPTH * unit if s.activation_offload and s.mode == "train" else 0.0
    base = HOST_BASE_SAMPLE_GIB if s.mode == "sample" else HOST_BASE_GIB
    return Plan(peak_gib=peak, host_ram_gib=max(loading, running) / GIB + base,
                parts={k: round(v / GIB, 2) for k, v in parts.items()})


def plan_precision(precision: str) -> str:
    """A base precision setting as the planner counts it: auto loads bf16 on a GPU."""
    return "bf16" if precision == "auto" else precision


def plan_targets(targets) -> tuple:
    """A run's LoRA targets (presets such as "ffn" expanded) that the planner counts: the block linears
    of TARGET_SHAPES; top-level targets (final_layer...) are too small to matter."""
    from .lora import expand_targets  # the one preset table (lora.py loads torch, as every caller has)

    return tuple(t for t in expand_targets(targets) if t in TARGET_SHAPES)


def training_plan_settings(train, dataset=None, *, compile: bool, selective: bool = False) -> PlanSettings:
    """The settings of a run's training on the full-size DiT: ``train`` a config.TrainSettings,
    ``dataset`` its config.DatasetSettings (the largest clip they allow; None: the default size).
    ``compile``: whether the blocks will be compiled (speed.compile_wanted on the run's device);
    ``selective``: checkpointing keeps the attention outputs (train.checkpointing_mode)."""
    size = {}
    if dataset is not None:
        from .data.datasets import largest_settings

        dataset = largest_settings(dataset)  # the largest clip over every dataset entry
        h, w = (int(v) for v in str(dataset.resolution).lower().split("x"))
        size = dict(height=h, width=w, num_frames=dataset.num_frames)
    return PlanSettings(precision=plan_precision(train.base_precision), rank=train.rank,
                        batch_size=train.batch_size, batch_tokens=getattr(train, "batch_tokens", 0),
                        optimizer=train.optimizer, targets=plan_targets(train.targets),
                        gradient_checkpointing=train.gradient_checkpointing,
                        activation_offload=train.activation_offload, blocks_to_swap=train.blocks_to_swap,
                        compile=compile, selective=selective, adapter=getattr(train, "adapter", "lora"), **size)


def sampling_plan_settings(height: int, width: int, num_frames: int, *, guided: bool, precision: str = "auto",
                           blocks_to_swap: int = 0, compile: bool = False) -> PlanSettings:
    """The settings of sampling one clip with the full-size DiT (``guided``: CFG, batch 2)."""
    return PlanSettings(mode="sample", height=height, width=width, num_frames=num_frames, cfg=guided,
                        precision=plan_precision(precision), blocks_to_swap=int(blocks_to_swap or 0),
                        compile=compile)


# Options in the order of their cost in step time (H100, full-size, docs/benchmarks.md: swap and
# activation offload < 3%; an int8 base compiled with activation offload 15.1 s a step, about 1.04x bf16's).
# int4 is not among them: optimum-quanto's int4 trains at 79.6 s a step against int8's 19.5 (both eager,
# activation offload, run 25) and does not compile; a user may still choose it.
def _candidates(s: PlanSettings):
    """(changes, settings) from the cheapest change to the dearest."""
    if s.mode == "sample":
        for n in (12, 24, 36, 44):
            yield {"blocks_to_swap": n}
        return
    yield {"activation_offload": True, "gradient_checkpointing": True}
    for n in SWAP_STEPS:  # the fewest swapped blocks that fit: the least pinned host memory, the least traffic
        if n > s.blocks_to_swap:
            yield {"blocks_to_swap": n, "activation_offload": True}
    # a quantized base: half the weights to keep or to stream (int8 runs on every CUDA GPU; torchao's
    # fp8 needs compute capability 8.9+)
    yield {"precision": "int8", "activation_offload": True}
    for n in SWAP_STEPS:
        yield {"precision": "int8", "blocks_to_swap": n, "activation_offload": True}
    yield {"precision": "fp8", "activation_offload": True}


def _label(changes: dict) -> str:
    first, *rest = [f"{k}={v}" for k, v in changes.items() if k != "gradient_checkpointing"]
    return first + (" with " + ", ".join(rest) if rest else "")


def suggest(s: PlanSettings, budget_gib: float) -> Optional[tuple[str, Plan]]:
    """The first (cheapest) change whose predicted peak fits ``budget_gib``, as (label, plan); None if
    none does."""
    for changes in _candidates(s):
        p = plan(replace(s, **changes))
        if p.peak_gib <= budget_gib:
            return _label(changes), p
    return None


def usable_gib(gpu_gib: float) -> float:
    """What a predicted peak (allocated memory) may reach on a GPU of ``gpu_gib``: the CUDA context takes
    about 0.5 GiB, and the caching allocator reserves more than it hands out, even with expandable
    segments (envinfo.configure_allocator): 6% on an uncapped H100 (run 25: 25.84 reserved for 24.28
    allocated). Capped at 24 and 16 GiB (run 26) the training runs filled the cap from their first step
    and the allocator freed its cache and retried (13 and 63 times in 4 steps), and the 16 GiB run's
    peak with its validation clip was 5.9% over the prediction. So 10% is left free."""
    return 0.90 * gpu_gib - 0.5


def recommend(s: PlanSettings, gpu_gib: float, host_gib: Optional[float] = None) -> Optional[tuple[dict, Plan]]:
    """The settings to change for a GPU of ``gpu_gib`` (``{}`` when ``s`` fits as it is) and their
    plan, the cheapest in step time first; None when nothing fits. ``host_gib``: also keep the
    predicted host RAM within it."""
    usable = usable_gib(gpu_gib)
    # the clip length last: every memory option at full length before fewer frames (4k + 1, down to 29)
    for frames in [s.num_frames] + list(range((s.num_frames - 1) // 16 * 16 + 13 - 16, 28, -16)):
        here = replace(s, num_frames=frames)
        for changes in ({}, *_candidates(here)):
            p = plan(replace(here, **changes))
            if p.peak_gib <= usable and (host_gib is None or p.host_ram_gib <= host_gib):
                return ({**changes, "num_frames": frames} if frames != s.num_frames else changes), p
    return None


def use_selective(s: PlanSettings, gpu_gib: Optional[float]) -> bool:
    """Whether checkpointing can also keep the attention outputs on this GPU: it needs the block
    inputs on the GPU (no activation offload, no block swap) and room for one more [N, 4096] tensor
    per block."""
    if s.mode != "train" or not gpu_gib or s.activation_offload or s.blocks_to_swap or not s.gradient_checkpointing:
        return False
    return plan(replace(s, selective=True)).peak_gib <= usable_gib(gpu_gib)


def report(s: PlanSettings, gpu_gib: Optional[float]) -> dict:
    """What 00_setup and 03_train_lora show: prediction, breakdown, and a warning with the fix."""
    p = plan(s)
    out = {"settings": asdict(s), "peak_gib": round(p.peak_gib, 1), "host_ram_gib": round(p.host_ram_gib, 1),
           "parts_gib": p.parts, "fits": None, "advice": ""}
    if gpu_gib:
        usable = usable_gib(gpu_gib)
        out["fits"] = p.peak_gib <= usable
        if not out["fits"]:
            sug = suggest(s, usable)
            out["advice"] = (f"predicted {p.peak_gib:.1f} GiB > {usable:.1f} GiB usable: set {sug[0]} "
                             f"(predicted {sug[1].peak_gib:.1f} GiB)" if sug else
                             f"predicted {p.peak_gib:.1f} GiB > {usable:.1f} GiB usable even with every memory "
                             "option: lower the resolution or the frame count")
    return out
