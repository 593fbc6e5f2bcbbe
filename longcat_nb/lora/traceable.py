"""peft's DoRA, LoKr and LoHa layers made traceable by torch.compile as one graph per block.

Two lines of peft (0.21) stop dynamo inside a block:

* LoKr and LoHa draw ``torch.rand(1)`` on every training call to decide module dropout, and branch on
  the result (a branch on a tensor: a graph break), even when module dropout is 0;
* DoRA asks whether the base weight is a torchao tensor with ``type(w).__module__.startswith(...)``,
  which dynamo cannot trace, and clears its (training-time always empty) weight-norm cache on every
  call: a mutation that a checkpointed region may not make under dynamo (selective checkpointing).

Inside a checkpointed block one break sends the whole block back to eager, so ``compile`` did nothing
for those types while it compiled LoRA (docs/benchmarks.md has the step times). ``make_traceable``
gives the injected layers forwards that compute the same result without those lines, and only where
they change nothing: module dropout 0 (the kit never sets another) and a plain ``nn.Parameter`` base
weight. Other cases keep peft's own code.

LoKr's delta is applied factor by factor (:func:`_lokr_delta`): peft builds the whole [out, in] ΔW
from its Kronecker factors on every call and multiplies the input by it, in the adapter's fp32, which
at 37,440 tokens is most of the step's extra cost over LoRA. Same sum, different rounding order.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

_MARK = "_longcat_traceable"


def _lycoris_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """LoKr/LoHa forward with module dropout 0: the base output plus each active adapter's delta."""
    active = [n for n in self.active_adapters if n in self._available_adapters]
    if self.disable_adapters or self.merged or any(self.module_dropout[n] for n in active):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name in active:
        delta = _lokr_delta(self, name, x) if _factored(self, name) else None
        result = result + (delta if delta is not None else self._get_delta_activations(name, x, *args, **kwargs))
    return result.to(x.dtype)


def _factored(layer, name: str) -> bool:
    """A LoKr adapter on a linear layer whose delta can be applied factor by factor (no rank dropout
    while training, no CP-decomposed conv factor)."""
    from peft.tuners.lokr.layer import LoKrLayer

    return (isinstance(layer, LoKrLayer) and isinstance(layer.get_base_layer(), nn.Linear)
            and name not in layer.lokr_t2 and not (layer.training and layer.rank_dropout[name]))


def _lokr_delta(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """x · kron(w1, w2)ᵀ · scale without building the [out, in] matrix: with x's last axis as a [b, d]
    grid, kron(w1 [a, b], w2 [c, d]) · x is w1 · X · w2ᵀ, [a, c] flattened. The same sum as peft's
    ``F.linear(x, ΔW)`` in the adapter's dtype, in (a + d) / (a·d) of its multiply-adds (32x fewer for a
    4096 x 4096 layer split 64 x 64), and no full ΔW to hold for the backward."""
    w1 = layer.lokr_w1[name] if name in layer.lokr_w1 else layer.lokr_w1_a[name] @ layer.lokr_w1_b[name]
    w2 = layer.lokr_w2[name] if name in layer.lokr_w2 else layer.lokr_w2_a[name] @ layer.lokr_w2_b[name]
    (a, b), (c, d) = w1.shape, w2.shape
    grid = x.to(w1.dtype).reshape(*x.shape[:-1], b, d)
    y = torch.matmul(w1, torch.matmul(grid, w2.t()))  # [..., a, c]
    return y.reshape(*x.shape[:-1], a * c) * layer.scaling[name]


def _clear_if_filled(self) -> None:
    """DoRA's cache clear, mutating only when something is cached (never while training)."""
    if self._dora_cache:
        self._dora_cache.clear()


def _plain_weight_first(dequantize):
    """peft's ``dequantize_module_weight`` with the plain-Parameter case answered first (traceable)."""
    if getattr(dequantize, _MARK, False):
        return dequantize

    def weight_of(module: nn.Module):
        w = module.weight
        if type(w) is nn.Parameter and not hasattr(module, "W_q"):
            return w  # what peft returns for an unquantized weight
        return dequantize(module)

    setattr(weight_of, _MARK, True)
    weight_of.__wrapped__ = dequantize
    return weight_of


def make_traceable(model: nn.Module) -> int:
    """Give every injected LoKr/LoHa layer of ``model`` the traceable forward, and every DoRA layer the
    traceable cache clear and weight lookup. Idempotent; returns how many layers changed."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora import dora

    changed = 0
    for module in model.modules():
        if isinstance(module, (LoKrLayer, LoHaLayer)) and not getattr(module, _MARK, False):
            module.forward = types.MethodType(_lycoris_forward, module)
            setattr(module, _MARK, True)
            changed += 1
        elif isinstance(module, dora.DoraLinearLayer) and not getattr(module, _MARK, False):
            module._cache_clear = types.MethodType(_clear_if_filled, module)
            setattr(module, _MARK, True)
            dora.dequantize_module_weight = _plain_weight_first(dora.dequantize_module_weight)
            changed += 1
    return changed
