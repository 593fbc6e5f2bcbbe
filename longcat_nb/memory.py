"""Memory features applied to a plain DiT: base-weight precision/quantization and block swap.

Each is a separate ``apply_*`` function chosen by settings (torchtitan style); the model file never
learns about them. Quantization touches only the big matrices of the blocks (attention, cross-
attention, FFN): the adaLN modulation, embedders and final layer stay in the weight dtype because
the official model computes them in float32 and they are small (4% of the weights).
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "int4", "fp8", "nf4")
QUANTIZED = ("int8", "int4", "fp8", "nf4")
BIG_LINEARS = re.compile(r"^(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|ffn\.w[123])$")

_BACKEND_HINT = {
    "int8": "optimum-quanto (pip install optimum-quanto)",
    "int4": "optimum-quanto (pip install optimum-quanto)",
    "fp8": "torchao (pip install torchao)",
    "nf4": "bitsandbytes (pip install bitsandbytes)",
}


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """dtype of activations and of the non-quantized weights for a base precision."""
    device = torch.device(device)
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if device.type == "cpu" and precision in QUANTIZED:
        return torch.float32  # CPU matmuls in bf16 are slow and not what a CPU run is for
    return torch.bfloat16


def _block_linears(block: nn.Module):
    for name, mod in block.named_modules():
        if type(mod) is nn.Linear and BIG_LINEARS.match(name):
            yield name, mod


def _quantize_block(block: nn.Module, precision: str, device: torch.device) -> None:
    names = [n for n, _ in _block_linears(block)]
    if precision in ("int8", "int4"):
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(block, weights=qint8 if precision == "int8" else qint4, include=names)
        freeze(block)
    elif precision == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        wanted = set(names)
        quantize_(block, Float8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in wanted)
    elif precision == "nf4":
        import bitsandbytes as bnb

        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, child)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  quant_type="nf4", compute_dtype=lin.weight.dtype, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.to(device), requires_grad=False, quant_type="nf4")
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.to(device), requires_grad=False)
            setattr(parent, child, q.to(device))  # .to() runs the 4-bit quantization
    else:
        raise ValueError(f"unknown quantized precision {precision!r}")


def apply_base_precision(model: nn.Module, precision: str, device: torch.device | str,
                         log: Callable[[str], None] = logger.info) -> nn.Module:
    """Put the frozen DiT on ``device`` in the chosen precision, one block at a time so the
    accelerator never holds the unquantized model (13.6B in bf16 is 25 GiB)."""
    if precision not in PRECISIONS:
        raise ValueError(f"base precision {precision!r}: choose one of {PRECISIONS}")
    device = torch.device(device)
    dtype = compute_dtype(precision, device)
    model.requires_grad_(False)
    if precision not in QUANTIZED:
        return model.to(device=device, dtype=dtype)
    try:
        for i, block in enumerate(model.blocks):
            block.to(device=device, dtype=dtype)
            _quantize_block(block, precision, device)
    except ImportError as e:
        raise ImportError(f"base precision {precision!r} needs {_BACKEND_HINT[precision]}: {e}") from e
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device=device, dtype=dtype)
    log(f"base weights: {precision} ({quantized_bytes(model) / 2**30:.2f} GiB of weights on {device})")
    return model


def _tensor_bytes(t: torch.Tensor) -> int:
    # Quantized weights (quanto, torchao) are tensor subclasses: count their packed inner tensors.
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the module's weights occupy (quantized tensors counted at their packed size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t.data if isinstance(t, nn.Parameter) else t)
    return total


# ---------------------------------------------------------------------------------------------
# block swap: weights of N blocks live in pinned CPU memory and stream in with prefetch
# ---------------------------------------------------------------------------------------------
class BlockSwap:
    """Keep the frozen weights of the last ``n`` blocks in pinned CPU memory and move each block to
    the GPU just before it runs, prefetching the next swapped block on a side stream.

    Only frozen base tensors move; LoRA parameters (trainable) stay on the GPU. When autograd may
    still need a block's weights they stay until the gradient of the block's input exists (a hook on
    that input), i.e. until the block's backward is done. With gradient checkpointing the first
    forward saves nothing, so weights are dropped right after it and fetched again by the recompute.
    """

    def __init__(self, model: nn.Module, n: int, device: torch.device | str):
        if block_swap_of(model) is not None:
            raise ValueError("the model already has a block swap: remove() it before applying another")
        self.device = torch.device(device)
        self.model = model
        self.blocks = list(model.blocks)
        n = max(0, min(int(n), len(self.blocks)))
        self.swapped = list(range(len(self.blocks) - n, len(self.blocks)))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.cpu: dict[int, list] = {}
        self.ready: dict[int, object] = {}
        self.in_model_forward = False
        self.handles = [
            model.register_forward_pre_hook(lambda m, a: setattr(self, "in_model_forward", True)),
            model.register_forward_hook(lambda m, a, o: setattr(self, "in_model_forward", False)),
        ]
        for i in self.swapped:
            pairs = [(t, self._to_host(t)) for t in self._frozen(self.blocks[i])]
            for t, host in pairs:
                t.data = host
            self.cpu[i] = pairs
            self.handles.append(self.blocks[i].register_forward_pre_hook(self._make_pre(i)))
            self.handles.append(self.blocks[i].register_forward_hook(self._make_post(i)))
        model._block_swap = self  # found by block_swap_of(); the model's own code never reads it

    @staticmethod
    def _frozen(block: nn.Module):
        seen = set()
        for t in list(block.parameters()) + list(block.buffers()):
            if not t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                yield t

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = t.data.detach().to("cpu")
        return host.pin_memory() if self.device.type == "cuda" else host

    def fetch(self, i: int) -> None:
        if i in self.ready or i not in self.cpu:
            return
        if self.stream is None:
            for t, host in self.cpu[i]:
                t.data = host.to(self.device)
            self.ready[i] = True
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for t, host in self.cpu[i]:
                t.data = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.ready[i] = ev

    def release(self, i: int) -> None:
        if i not in self.ready:
            return
        if self.stream is not None:
            # the copies' memory may be freed only once the compute using them has been queued
            stream = torch.cuda.current_stream(self.device)
            for t, _ in self.cpu[i]:
                _record_stream(t.data, stream)
        for t, host in self.cpu[i]:
            t.data = host
        del self.ready[i]

    def release_all(self) -> None:
        """Back to CPU memory with every fetched block (a pass that failed midway leaves some)."""
        for i in list(self.ready):
            self.release(i)

    def _neighbour(self, i: int, step: int) -> Optional[int]:
        j = i + step
        return j if j in self.cpu else None

    def _make_pre(self, i: int):
        def pre(module, args):
            self.fetch(i)
            ev = self.ready.get(i)
            if isinstance(ev, torch.cuda.Event):
                torch.cuda.current_stream(self.device).wait_event(ev)
            # forward runs blocks upwards, the backward recompute downwards
            nxt = self._neighbour(i, 1 if self.in_model_forward else -1)
            if nxt is not None:
                self.fetch(nxt)
            x = args[0] if args else None
            if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda g: (self.release(i), g)[1])
        return pre

    def _make_post(self, i: int):
        def post(module, args, output):
            checkpointed = getattr(self.model, "gradient_checkpointing", False) and self.in_model_forward
            if not torch.is_grad_enabled() or checkpointed:
                self.release(i)
        return post

    def sync(self) -> None:
        """Take in the frozen tensors that appeared in the swapped blocks since (e.g. a sampling LoRA
        injected there, created next to the base weight in CPU memory) and forget the ones that are
        gone (the LoRA removed again). Call it between forward passes."""
        self.release_all()
        for i in self.swapped:
            known = {id(t): (t, host) for t, host in self.cpu[i]}
            pairs = []
            for t in self._frozen(self.blocks[i]):
                if id(t) not in known:
                    known[id(t)] = (t, self._to_host(t))
                    t.data = known[id(t)][1]
                pairs.append(known[id(t)])
            self.cpu[i] = pairs

    def move_resident(self, device: torch.device | str) -> None:
        """Move everything except the swapped blocks' frozen weights (they stay in CPU memory and
        stream in block by block) to ``device``: the model-level offload of a swapped model."""
        self.release_all()
        device = torch.device(device)
        for i, block in enumerate(self.blocks):
            if i not in self.cpu:
                block.to(device)
                continue
            managed = {id(t) for t, _ in self.cpu[i]}
            for t in list(block.parameters()) + list(block.buffers()):
                if id(t) not in managed:
                    t.data = t.data.to(device)
        for child in self.model.children():
            if child is not self.model.blocks:
                child.to(device)
        for t in list(self.model._parameters.values()) + list(self.model._buffers.values()):
            if t is not None:
                t.data = t.data.to(device)

    def remove(self) -> None:
        """Undo: every block back on the device, hooks removed."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if getattr(self.model, "_block_swap", None) is self:
            del self.model._block_swap
        for i in self.swapped:
            self.fetch(i)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ready.clear()
        self.cpu.clear()


def _record_stream(t: torch.Tensor, stream) -> None:
    """record_stream on a tensor or, for quantized tensor subclasses, on their inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            _record_stream(getattr(t, name), stream)
    else:
        t.record_stream(stream)


def apply_block_swap(model: nn.Module, blocks_to_swap: int, device) -> Optional[BlockSwap]:
    if not blocks_to_swap:
        return None
    swap = BlockSwap(model, blocks_to_swap, device)
    logger.info("block swap: %d of %d blocks stream from CPU memory", len(swap.swapped), len(swap.blocks))
    return swap


def block_swap_of(model: nn.Module) -> Optional[BlockSwap]:
    """The BlockSwap applied to ``model`` (None when there is none)."""
    return getattr(model, "_block_swap", None)


def apply_inference_memory(model: nn.Module, precision: str, blocks_to_swap: int, device: torch.device | str,
                           home: torch.device | str | None = None,
                           log: Callable[[str], None] = logger.info) -> Optional[BlockSwap]:
    """The frozen DiT for sampling, the pieces in the order that keeps the GPU small: base precision
    (quantized block by block on ``device``), then block swap (the last ``blocks_to_swap`` blocks'
    weights to pinned CPU memory), then the rest to ``home`` (``device``, or the CPU for the
    model-level offload, where sampling moves it to ``device`` only while it runs).

    An unquantized model is cast where it was loaded (the CPU) and only its resident part ever
    reaches the GPU, so bf16 with 24 swapped blocks loads within 24 GiB. LoRAs applied later for a
    call (lora.apply_loras) land next to their base weights; ``BlockSwap.sync`` takes them in."""
    if precision not in PRECISIONS:
        raise ValueError(f"base precision {precision!r}: choose one of {PRECISIONS}")
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int) or blocks_to_swap < 0:
        raise ValueError(f"blocks_to_swap={blocks_to_swap!r}: use a whole number from 0 to the block count")
    device = torch.device(device)
    home = torch.device(home) if home is not None else device
    if precision in QUANTIZED:
        apply_base_precision(model, precision, device, log=log)
    else:
        model.requires_grad_(False).to(dtype=compute_dtype(precision, device))
    swap = apply_block_swap(model, blocks_to_swap, device)
    if swap is not None:
        swap.move_resident(home)
    else:
        model.to(home)
    return swap


# ---------------------------------------------------------------------------------------------
# activation offload: the input each checkpointed block keeps for its recompute lives on the CPU
# ---------------------------------------------------------------------------------------------
class _OffloadedCheckpoint(torch.autograd.Function):
    """Run a block without keeping anything on the GPU but a pinned CPU copy of its input; in the
    backward, bring the input back, recompute with grad and backpropagate through the block.

    The block's trainable parameters (the LoRA) are inputs of the Function, so autograd knows the
    output depends on them even when the block input itself needs no gradient (the first block)."""

    @staticmethod
    def forward(ctx, block, n_args, *flat):
        args, params = list(flat[:n_args]), list(flat[n_args:])
        ctx.block, ctx.params = block, params
        ctx.devices = [a.device if torch.is_tensor(a) else None for a in args]
        ctx.needs = [torch.is_tensor(a) and a.requires_grad for a in args]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state() if args[0].is_cuda else None
        saved = []
        for a in args:
            if torch.is_tensor(a) and a.is_cuda and a.numel() > 1 << 20:
                host = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
                host.copy_(a, non_blocking=True)
                saved.append(host)
            else:
                saved.append(a.detach() if torch.is_tensor(a) else a)
        ctx.saved_args = saved
        with torch.no_grad():
            return block(*args)

    @staticmethod
    def backward(ctx, grad_out):
        args = []
        for a, dev, need in zip(ctx.saved_args, ctx.devices, ctx.needs):
            if torch.is_tensor(a):
                a = a.to(dev, non_blocking=True).detach().requires_grad_(need)
            args.append(a)
        rng_devices = [args[0].device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng)
            with torch.enable_grad():
                out = ctx.block(*args)
        wrt_args = [a for a, need in zip(args, ctx.needs) if need]
        grads = torch.autograd.grad(out, wrt_args + ctx.params, grad_out, allow_unused=True)
        it = iter(grads[: len(wrt_args)])
        arg_grads = [next(it) if need else None for need in ctx.needs]
        ctx.saved_args = ctx.params = None
        return (None, None, *arg_grads, *grads[len(wrt_args):])


def offloaded_checkpoint(block, *args):
    params = [p for p in block.parameters() if p.requires_grad]
    return _OffloadedCheckpoint.apply(block, len(args), *args, *params)


def apply_activation_offload(model: nn.Module) -> nn.Module:
    """Per-block checkpointing whose saved block inputs live in pinned CPU memory (14.7 GB at
    480x832x93 for 48 blocks stay off the GPU); the copies overlap with compute."""
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError("activation offload needs a model with per-block gradient checkpointing")
    model.enable_gradient_checkpointing(gradient_checkpointing_func=offloaded_checkpoint)
    return model
