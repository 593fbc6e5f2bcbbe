"""A plain DiT made ready to train or to sample, torchtitan style: the speed and memory pieces
(memory.py, speed.py, distributed.py, lora/) applied by separate functions in ONE fixed order,
written once here for both paths:

    1. base precision   quantized block by block on the GPU, or cast where the model lies
    2. activation checkpointing   (training)
    3. attention backend   the model's backend object, and the fastest fused SDPA kernel on CUDA
    4. adapter   the LoRA to train, its weights and optimizer state in fp32   (training)
    5. FSDP sharding of the frozen base   (training on several processes)
    6. block swap   the last N blocks' weights in pinned host memory, the resident part to the GPU
    7. compile   each block, after everything above changed its forward

Why this order: quantization and the adapter must see the plain linears; checkpointing wraps the
block forward the adapter then patches inside; sharding must see the adapter's parameters to leave
them replicated; block swap moves the weights the earlier steps left; compile traces the forward
they all leave. The model file never learns about any of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .memory import (PRECISIONS, QUANTIZED, BlockSwap, apply_base_precision, apply_block_swap,
                     apply_gradient_checkpointing, compute_dtype, logger)


@dataclass
class Prepared:
    """What prepare_for_training did to the model, for the loop and its log."""
    model: nn.Module
    params: list  # the trainable (LoRA) parameters, fp32
    swap: Optional[BlockSwap]
    attention: str  # the backend that actually runs
    checkpointing: str
    compiled: bool
    load_s: float = 0.0  # seconds from reading the checkpoint to this (train._model sets it)


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------
def apply_attention(model: nn.Module, backend, device) -> str:
    """The attention backend (None: the one the model was loaded with), and on CUDA the fastest fused
    SDPA kernel of the GPU (speed.default_sdpa_preference); returns the backend that runs."""
    from .speed import default_sdpa_preference, set_sdpa_preference

    name = model.set_attention_backend(backend) if backend is not None else model.attention_backend
    if torch.device(device).type == "cuda":
        set_sdpa_preference(default_sdpa_preference())
    return name


def apply_adapter(model: nn.Module, s) -> list:
    """The LoRA of the training settings ``s`` (seeded by s.seed); returns its parameters, in fp32."""
    from . import lora

    torch.manual_seed(s.seed)  # LoRA init
    lora.add_lora(model, rank=s.rank, alpha=s.alpha, dropout=s.dropout, targets=s.targets, adapter=s.adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights and their optimizer state in fp32
    return params


def apply_swap(model: nn.Module, blocks_to_swap: int, device, home) -> Optional[BlockSwap]:
    """The last ``blocks_to_swap`` blocks' weights to pinned host memory, then the resident part to
    ``home`` (None: leave it where it is)."""
    swap = apply_block_swap(model, blocks_to_swap, device)
    if home is not None:
        (swap.move_resident if swap is not None else model.to)(home)
    return swap


def apply_compile_choice(model: nn.Module, compile, device, log, precision: str = "bf16") -> bool:
    """Compile each block where ``compile`` (auto | on | off), the device and the base ``precision`` allow;
    True when compiled."""
    from .planner import NOT_COMPILED
    from .speed import apply_compile, compile_choice, compile_wanted

    if precision in NOT_COMPILED and compile_choice(compile) != "off":
        if torch.device(device).type == "cuda":
            log(f"compile={compile_choice(compile)}: running eagerly (an {precision} base does not compile: "
                "optimum-quanto's int4 fails inside Inductor; int8 compiles)")
        return False
    if not compile_wanted(compile, device, log):
        return False
    apply_compile(model, scope="blocks")
    return True


# ---------------------------------------------------------------------------------------------
# the two compositions
# ---------------------------------------------------------------------------------------------
def prepare_for_training(model: nn.Module, s, device, dist, attention, checkpointing: str,
                         log: Callable[[str], None] = print) -> Prepared:
    """The frozen base of the training settings ``s`` with the LoRA on top, in the order above.

    Sharded: a model loaded on the CPU is cast there and fully_shard moves each rank's shard to its
    GPU; one already on this rank's device (built there) stays and is sharded in place. Swapped: cast
    on the CPU too, and only the resident part goes to the GPU: the whole bf16 model (25 GiB) never
    passes through a 16 or 24 GiB card."""
    from . import distributed

    device = torch.device(device)
    quantized = s.base_precision in QUANTIZED
    on_device = next(model.parameters()).device == device
    swapping = bool(s.blocks_to_swap) and device.type == "cuda"
    base_device = "cpu" if (dist.enabled or swapping) and not quantized and not on_device else device
    model = apply_base_precision(model, s.base_precision, base_device, log=log)               # 1
    apply_gradient_checkpointing(model, checkpointing)                                         # 2
    name = apply_attention(model, attention, device)                                           # 3
    params = apply_adapter(model, s)                                                         # 4
    if dist.enabled:                                                                           # 5
        distributed.shard_frozen_base(model, dist, params, quantized)
        for p in params:
            p.data = p.data.to(device)
        distributed.sync_lora(params, dist)
    swap = apply_swap(model, s.blocks_to_swap if swapping else 0, device,                      # 6
                      device if swapping and base_device == "cpu" else None)
    compiled = apply_compile_choice(model, s.compile, device, log, s.base_precision)            # 7
    log(f"checkpointing: {checkpointing}; compiled blocks: {compiled}")
    return Prepared(model, params, swap, name, checkpointing, compiled)


def prepare_for_sampling(model: nn.Module, precision: str, blocks_to_swap: int, device, home=None,
                         compile="auto", placed: bool = False, log: Optional[Callable[[str], None]] = None) -> dict:
    """The frozen DiT for sampling, in the order above (no checkpointing, adapter or sharding: LoRAs
    are applied per call, lora.apply_loras, on top of what this leaves). Returns how it was placed,
    for the settings record.

    ``placed``: the model was loaded where it runs in its dtype (the plain path), so only attention
    and compile remain. Otherwise: quantized block by block on ``device``, or cast where it lies (the
    CPU), then the last ``blocks_to_swap`` blocks' weights to pinned CPU memory, then the rest to
    ``home`` (``device``, or the CPU for the model-level offload, where sampling moves it to
    ``device`` only while it runs); bf16 with 24 swapped blocks loads within 24 GiB. LoRAs applied
    later land next to their base weights; ``BlockSwap.sync`` takes them in."""
    if precision not in PRECISIONS:
        raise ValueError(f"base precision {precision!r}: choose one of {PRECISIONS}")
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int) or blocks_to_swap < 0:
        raise ValueError(f"blocks_to_swap={blocks_to_swap!r}: use a whole number from 0 to the block count")
    device = torch.device(device)
    home = torch.device(home) if home is not None else device
    if not placed:
        if precision in QUANTIZED:                                                             # 1
            apply_base_precision(model, precision, device, log=log or logger.info, backward=False)
        else:
            # nn.Module's .to: diffusers' own warns of "modules kept in float32: []" on any cast
            nn.Module.to(model.requires_grad_(False), dtype=compute_dtype(precision, device))
    apply_attention(model, None, device)                                                       # 3
    if not placed:
        apply_swap(model, blocks_to_swap, device, home)                                        # 6
    compiled = apply_compile_choice(model, compile, device, print, precision)                  # 7
    return {"precision": precision, "blocks_to_swap": 0 if placed else blocks_to_swap, "compile": compiled}
