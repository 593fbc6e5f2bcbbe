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

from .config import PRECISIONS, QUANTIZED
from .pinned import HostPool, pack

logger = logging.getLogger(__name__)

BIG_LINEARS = re.compile(r"^(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|ffn\.w[123])$")

_BACKEND_HINT = {
    "int8": "optimum-quanto (pip install optimum-quanto)",
    "int4": "optimum-quanto (pip install optimum-quanto)",
    "fp8": "torchao (pip install torchao)",
    "fp8_rowwise": "torch >= 2.5 with float8 matmuls (torch._scaled_mm)",
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


def quantize_block(block: nn.Module, precision: str, device: torch.device | str, backward: bool = True) -> None:
    """One DiT block, its weights already on ``device`` in the compute dtype, to a QUANTIZED precision
    (its linear layers); marked, so apply_base_precision leaves it as it is (model_files.load_dit's
    ``each_block`` quantizes the blocks as they load)."""
    device = torch.device(device)
    try:
        _quantize_block(block, precision, device, backward)
    except ImportError as e:
        raise ImportError(f"base precision {precision!r} needs {_BACKEND_HINT[precision]}: {e}") from e
    block.base_precision = precision


def _quantize_block(block: nn.Module, precision: str, device: torch.device, backward: bool = True) -> None:
    names = [n for n, _ in _block_linears(block)]
    if precision == "fp8_rowwise":
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, child, Float8RowwiseLinear.from_linear(getattr(parent, child), backward=backward))
    elif precision in ("int8", "int4"):
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
                         log: Callable[[str], None] = logger.info, backward: bool = True) -> nn.Module:
    """Put the frozen DiT on ``device`` in the chosen precision, one block at a time so the
    accelerator never holds the unquantized model (13.6B in bf16 is 25 GiB). ``backward=False``
    (sampling) lets fp8_rowwise skip the transposed weight copy only gradients need."""
    if precision not in PRECISIONS:
        raise ValueError(f"base precision {precision!r}: choose one of {PRECISIONS}")
    device = torch.device(device)
    dtype = compute_dtype(precision, device)
    model.requires_grad_(False)
    if precision not in QUANTIZED:
        # nn.Module's own .to: diffusers' warns on every dtype cast that modules "should be kept in
        # float32: []" (an empty list for this model), which a user would take for a fault
        return nn.Module.to(model, device=device, dtype=dtype)
    for block in model.blocks:
        if getattr(block, "base_precision", None) != precision:  # not quantized as it loaded
            block.to(device=device, dtype=dtype)
            quantize_block(block, precision, device, backward)
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device=device, dtype=dtype)
    log(f"base weights: {precision} ({quantized_bytes(model) / 2**30:.2f} GiB of weights on {device})")
    return model


def _tensor_bytes(t: torch.Tensor) -> int:
    # Quantized weights (quanto, torchao) are tensor subclasses: count their packed inner tensors.
    return sum(leaf.numel() * leaf.element_size() for leaf in _leaves(t))


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the module's weights occupy (quantized tensors counted at their packed size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t.data if isinstance(t, nn.Parameter) else t)
    return total


# ---------------------------------------------------------------------------------------------
# fp8_rowwise: float8 matmuls for the frozen base (weights and activations scaled per row)
# ---------------------------------------------------------------------------------------------
# Written here rather than taken from torchao: torchao's inference float8 linear has no backward
# (torch._scaled_mm is not differentiable) and its training Float8Linear re-quantizes the bf16
# weight every call and always computes the weight gradient, a fourth of the matmul work that a
# frozen LoRA base throws away. The base here is quantized once; its backward is the input gradient.
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (float8 [N, K], fp32 scale [N, 1]) with x ~= q * scale (amax per row -> 448)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class _Float8Matmul(torch.autograd.Function):
    """y = x @ (s_w * W_q)^T with x quantized per token; dL/dx through the transposed fp8 copy."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, w_t, out_dtype):
        xq, xs = quantize_rowwise(x)
        ctx.save_for_backward(w_scale, w_t)
        ctx.out_dtype = out_dtype
        return torch._scaled_mm(xq, w_q.t(), scale_a=xs, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        w_scale, w_t = ctx.saved_tensors
        if w_t is None or w_t.numel() == 0:
            raise RuntimeError("this fp8_rowwise layer was quantized for sampling (backward=False): "
                               "quantize with backward=True to train through it")
        # dL/dx = g @ diag(s_w) @ W_q: fold the weight scales into g, then one fp8 matmul with W_q^T
        gq, gs = quantize_rowwise(grad.float() * w_scale.view(1, -1))
        ones = torch.ones(1, w_t.shape[0], device=grad.device, dtype=torch.float32)
        gx = torch._scaled_mm(gq, w_t.t(), scale_a=gs, scale_b=ones, out_dtype=ctx.out_dtype)
        return gx, None, None, None, None


class Float8RowwiseLinear(nn.Linear):
    """A frozen Linear whose matmuls run in float8 (e4m3) with per-row scales: the weight is
    quantized once per output channel, each input row (token) per call. ``weight_t`` (the same fp8
    values transposed, for the input gradient) exists only when built with ``backward=True``.
    ``compute_dtype`` tells peft which dtype a LoRA on top should take (not float8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None,
                 compute_dtype=torch.bfloat16, backward: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=FP8),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, device=device, dtype=torch.float32))
        self.register_buffer("weight_t", torch.empty((in_features, out_features) if backward else (0,),
                                                     device=device, dtype=FP8))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=compute_dtype),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, backward: bool = True) -> "Float8RowwiseLinear":
        w = lin.weight.detach()
        if lin.in_features % 16 or lin.out_features % 16:
            raise ValueError(f"fp8_rowwise needs in/out features divisible by 16, got {lin.in_features}x"
                             f"{lin.out_features}")
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device,
                compute_dtype=w.dtype, backward=backward)
        with torch.no_grad():
            q, s = quantize_rowwise(w)
            m.weight.data = q
            m.weight_scale.copy_(s.view(-1))
            if backward:
                m.weight_t = q.t().contiguous()
            if lin.bias is not None:
                m.bias.data = lin.bias.detach().to(w.dtype)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else self.compute_dtype
        y = _Float8Matmul.apply(x2, self.weight, self.weight_scale, self.weight_t, dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8 e4m3 rowwise, backward={self.weight_t.numel() > 0}")


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
        self.slabs: dict[int, object] = {}  # the page-locked buffer holding each swapped block's weights
        for i in self.swapped:
            frozen = list(self._frozen(self.blocks[i]))
            # one exact-size buffer per block (torch's pin_memory() would round each tensor up to a power of two)
            self.slabs[i], hosts = pack([t.data for t in frozen], pin=self.device.type == "cuda")
            for t, host in zip(frozen, hosts):
                t.data = host
            self.cpu[i] = list(zip(frozen, hosts))
            self.handles.append(self.blocks[i].register_forward_pre_hook(self._make_pre(i)))
            self.handles.append(self.blocks[i].register_forward_hook(self._make_post(i)))
        model._block_swap = self  # found by block_swap_of(); the model's own code never reads it

    @staticmethod
    def _frozen(block: nn.Module):
        """The frozen tensors to move: plain ones as they are; of a quantized tensor subclass (optimum-quanto
        int8/int4, torchao fp8), its inner plain tensors, whose storage can be swapped in place (assigning
        ``.data`` of the subclass itself leaves its GPU copy where it is)."""
        seen = set()
        for t in list(block.parameters()) + list(block.buffers()):
            if not t.requires_grad:
                for leaf in _leaves(t):
                    if id(leaf) not in seen:
                        seen.add(id(leaf))
                        yield leaf

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A frozen tensor that appeared after the swap began (sync): its own small pinned copy."""
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
                if not any(id(leaf) in managed for leaf in _leaves(t)):
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
        self.slabs.clear()


def _leaves(t: torch.Tensor):
    """``t`` itself, or for a tensor subclass (quantized weights) its inner plain tensors, recursively."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def _record_stream(t: torch.Tensor, stream) -> None:
    """record_stream on a tensor or, for quantized tensor subclasses, on their inner tensors."""
    for leaf in _leaves(t):
        leaf.record_stream(stream)


def apply_block_swap(model: nn.Module, blocks_to_swap: int, device) -> Optional[BlockSwap]:
    if not blocks_to_swap:
        return None
    swap = BlockSwap(model, blocks_to_swap, device)
    logger.info("block swap: %d of %d blocks stream from CPU memory", len(swap.swapped), len(swap.blocks))
    return swap


def block_swap_of(model: nn.Module) -> Optional[BlockSwap]:
    """The BlockSwap applied to ``model`` (None when there is none)."""
    return getattr(model, "_block_swap", None)


# ---------------------------------------------------------------------------------------------
# activation checkpointing: what each block keeps for the backward
# ---------------------------------------------------------------------------------------------
class _BlockCheckpoint(torch.autograd.Function):
    """Run a block keeping nothing but its input (on the GPU, or with ``offload``, an
    OffloadedCheckpoint, a page-locked host copy from its pool); in the backward, bring the input
    back, recompute with grad and backpropagate.

    Unlike torch.utils.checkpoint there is no recompute check on saved-tensor metadata, so the block
    may be a compiled one (its no-grad and its training graphs differ; the check rejected that), and
    module hooks (block swap) run in both passes. The block's trainable parameters (the LoRA) are
    inputs of the Function, so autograd knows the output depends on them even when the block input
    itself needs no gradient (the first block)."""

    @staticmethod
    def forward(ctx, block, offload, n_args, *flat):
        args, params = list(flat[:n_args]), list(flat[n_args:])
        ctx.block, ctx.params = block, params
        ctx.devices = [a.device if torch.is_tensor(a) else None for a in args]
        ctx.needs = [torch.is_tensor(a) and a.requires_grad for a in args]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state() if args[0].is_cuda else None
        saved = []
        for a in args:
            if offload is not None and torch.is_tensor(a) and a.is_cuda and a.numel() > offload.min_numel:
                host = offload.pool.take(a.shape, a.dtype)  # back to the pool when the backward drops it
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
        return (None, None, None, *arg_grads, *grads[len(wrt_args):])


def recompute_checkpoint(block, *args):
    """Full activation checkpointing of one block (its input stays on the GPU)."""
    params = [p for p in block.parameters() if p.requires_grad]
    return _BlockCheckpoint.apply(block, None, len(args), *args, *params)


class OffloadedCheckpoint:
    """Full activation checkpointing with the block input in page-locked host memory, from a pool
    of exact-size buffers that the model keeps from step to step (pinned.HostPool)."""

    def __init__(self, min_numel: int = 1 << 20):
        self.pool = HostPool()
        self.min_numel = min_numel  # smaller inputs (timestep embedding, masks) stay on the GPU

    def __call__(self, block, *args):
        params = [p for p in block.parameters() if p.requires_grad]
        return _BlockCheckpoint.apply(block, self, len(args), *args, *params)


class _KeptOps:
    """``op in _ATTENTION_OPS``: whether an attention backend names ``op`` as one whose output selective
    checkpointing keeps (AttentionBackend.kept_ops: the expensive ones; models/attention/)."""

    def __contains__(self, func) -> bool:
        from .models.attention import kept_ops

        return getattr(func, "_name", None) in kept_ops()


# Ops whose outputs "selective" keeps, over the video tokens; everything else is recomputed.
_ATTENTION_OPS = _KeptOps()
LONG_KEYS = 4096  # keys above this are video tokens (text has <= 512)


def _keep_attention(ctx, func, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if func in _ATTENTION_OPS and args[1].shape[-2] > LONG_KEYS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_attention)


class _NoInPlaceCaution(logging.Filter):
    """Drops torch's caution, printed when a compiled block meets ``context_fn``, that the checkpointed
    region must hold no in-place ops: the block holds none, and the GPU test
    ``test_compiled_training_matches_eager_and_resumes`` checks compiled selective training against eager."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


def _quiet_in_place_caution() -> None:
    log = logging.getLogger("torch._higher_order_ops.wrap")
    if not any(isinstance(f, _NoInPlaceCaution) for f in log.filters):
        log.addFilter(_NoInPlaceCaution())


def _selective_forward(block: nn.Module):
    inner = block.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(inner, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)

    forward._longcat_selective = inner
    return forward


CHECKPOINTING = ("none", "full", "selective", "offload")


def apply_gradient_checkpointing(model: nn.Module, mode: str = "full") -> nn.Module:
    """What each block keeps for the backward (torchtitan's apply_ac, for this DiT):

    * ``full``: only its input; everything is recomputed (the least memory that stays on the GPU).
    * ``selective``: its input and the video self-attention outputs (about 0.3 GiB a block at
      480x832x93); the backward recomputes everything but attention. Checkpointing happens inside
      each block's forward, so a compiled block compiles it too. Not with block swap.
    * ``offload``: like full, with the inputs in pinned CPU memory (14.7 GB at 480x832x93 for 48
      blocks stay off the GPU); the copies overlap with compute.
    * ``none``: everything is kept (fastest, only for small clips or short models).
    """
    if mode not in CHECKPOINTING:
        raise ValueError(f"checkpointing {mode!r}: choose one of {CHECKPOINTING}")
    if mode != "none" and not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError("this model has no per-block gradient checkpointing")
    for block in model.blocks:  # undo an earlier selective wrap
        if hasattr(block.forward, "_longcat_selective"):
            if hasattr(block.forward, "_longcat_eager"):
                raise ValueError("change checkpointing before speed.apply_compile, not after")
            block.forward = block.forward._longcat_selective
            if getattr(block.forward, "__func__", None) is type(block).forward:
                del block.forward
    if mode == "none":
        model.disable_gradient_checkpointing()
    elif mode == "selective":
        model.disable_gradient_checkpointing()  # the blocks checkpoint themselves
        _quiet_in_place_caution()
        for block in model.blocks:
            block.forward = _selective_forward(block)
    else:
        func = OffloadedCheckpoint() if mode == "offload" else recompute_checkpoint
        model.enable_gradient_checkpointing(gradient_checkpointing_func=func)
    model.checkpointing_mode = mode
    return model


def apply_activation_offload(model: nn.Module) -> nn.Module:
    """Per-block checkpointing whose saved block inputs live in pinned CPU memory."""
    return apply_gradient_checkpointing(model, "offload")
