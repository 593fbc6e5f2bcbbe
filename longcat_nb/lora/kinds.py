"""Adapter types beside plain LoRA, all peft's own: DoRA (``LoraConfig(use_dora=True)``), LoKr
(``LoKrConfig``) and LoHa (``LoHaConfig``). Internal layout: peft's state-dict keys with the
``transformer.`` prefix, one group of parts per target Linear (module path P):

* lora: ``P.lora_A.weight`` [r, in], ``P.lora_B.weight`` [out, r]; ΔW = alpha/r · B·A
* dora: the LoRA parts + ``P.lora_magnitude_vector`` [out]; W' = m · (W + ΔW) / ‖W + ΔW‖ (per output row)
* loha: ``P.hada_w1_a`` [out, r], ``hada_w1_b`` [r, in], ``hada_w2_a``, ``hada_w2_b``;
  ΔW = alpha/r · (w1_a·w1_b) ⊙ (w2_a·w2_b)
* lokr: ``P.lokr_w1`` [a, b] (or ``lokr_w1_a``·``lokr_w1_b``), ``P.lokr_w2`` [c, d] (or
  ``lokr_w2_a`` [c, r]·``lokr_w2_b`` [r, d]); ΔW = alpha/r · kron(w1, w2), out = a·c, in = b·d

``alpha`` and ``r`` mean what peft means by them for every type (scale = alpha/r)."""
from __future__ import annotations

import re
from typing import Optional

import torch

from .state import PEFT_PREFIX, LoraError

ADAPTER_PARTS = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
_PART = r"lora_A\.weight|lora_B\.weight|lora_magnitude_vector|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?"
_KEY = re.compile(rf"^(?:{re.escape(PEFT_PREFIX)})?(.+)\.({_PART})$")
# a parameter of an injected adapter (peft names it <module>.<part>.<adapter>[.weight])
_PARAM = r"\.(?:lora_A|lora_B|lora_magnitude_vector|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)\.{}(?:\.weight)?$"


def is_adapter_param(name: str, adapter_name: str) -> bool:
    return re.search(_PARAM.format(re.escape(adapter_name)), name) is not None


def adapter_of(state: dict) -> str:
    """'lora' | 'dora' | 'loha' | 'lokr' from the key names."""
    keys = " ".join(state)
    for kind, mark in (("dora", "lora_magnitude_vector"), ("loha", ".hada_w"), ("lokr", ".lokr_w")):
        if mark in keys:
            return kind
    return "lora"


def modules(state: dict, where: str = "") -> dict:
    """module path -> {part: tensor}; every module of one type, with the parts that type needs."""
    kind, mods = adapter_of(state), {}
    for k, v in state.items():
        m = _KEY.match(k)
        if not m or m.group(2) not in ADAPTER_PARTS[kind]:
            raise LoraError(f"{where}unexpected key {k!r} in a {kind} adapter (its parts: "
                            f"{', '.join(ADAPTER_PARTS[kind])})")
        mods.setdefault(m.group(1), {})[m.group(2)] = v
    for mod, t in mods.items():
        _check_parts(kind, mod, t, where)
    return mods


def _check_parts(kind: str, mod: str, t: dict, where: str) -> None:
    if kind == "lokr":
        whole_or_pair = [f"lokr_w{i}" in t or {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(t) for i in (1, 2)]
        if not all(whole_or_pair):
            raise LoraError(f"{where}LoKr module {mod!r} needs lokr_w1 (or lokr_w1_a and _b) and lokr_w2 (or "
                            f"lokr_w2_a and _b); found {sorted(t)}")
    elif missing := [p for p in ADAPTER_PARTS[kind] if p not in t]:
        raise LoraError(f"{where}{kind} module {mod!r} lacks {missing}; found {sorted(t)}")


def _w(t: dict, i: int) -> torch.Tensor:
    """LoKr factor w1 or w2 as one matrix."""
    full = t.get(f"lokr_w{i}")
    return full if full is not None else t[f"lokr_w{i}_a"] @ t[f"lokr_w{i}_b"]


def shapes(state: dict, where: str = "") -> dict:
    """module -> (out, in) of the Linear each adapter module fits."""
    out = {}
    for mod, t in modules(state, where).items():
        if "lora_A.weight" in t:
            out[mod] = (t["lora_B.weight"].shape[0], t["lora_A.weight"].shape[1])
        elif "hada_w1_a" in t:
            out[mod] = (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
        else:
            w1, w2 = _w(t, 1), _w(t, 2)
            out[mod] = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
    return out


def ranks(state: dict, header_ranks: Optional[dict] = None, where: str = "") -> dict:
    """module -> peft's r. A LoKr whose w2 is whole has no rank in its tensors: the header's
    (``header_ranks``) or, lacking it, the smallest r for which peft keeps w2 whole."""
    out = {}
    for mod, t in modules(state, where).items():
        if "lora_A.weight" in t:
            out[mod] = int(t["lora_A.weight"].shape[0])
        elif "hada_w1_b" in t:
            out[mod] = int(t["hada_w1_b"].shape[0])
        elif "lokr_w2_b" in t or "lokr_w1_b" in t:
            out[mod] = int(t.get("lokr_w2_b", t.get("lokr_w1_b")).shape[0])
        else:
            out[mod] = int((header_ranks or {}).get(mod) or implied_rank(t["lokr_w2"]))
    return out


def implied_rank(w2: torch.Tensor) -> int:
    """The smallest r for which peft keeps a LoKr's w2 whole (r >= max(w2's sides) / 2)."""
    return -(-max(w2.shape) // 2)


def delta(t: dict, scale: float) -> torch.Tensor:
    """ΔW of one LoRA/LoHa/LoKr module at ``scale`` = alpha/r (float32 at least). A DoRA has none:
    its weight depends on the base weight's norm."""
    t = {k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in t.items()}
    if "lora_magnitude_vector" in t:
        raise LoraError("a DoRA module has no additive ΔW: its weight is m·(W+ΔW)/‖W+ΔW‖, set by the base weight")
    if "lora_A.weight" in t:
        return scale * (t["lora_B.weight"] @ t["lora_A.weight"])
    if "hada_w1_a" in t:
        return scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    return scale * torch.kron(_w(t, 1), _w(t, 2))


def deltas(state: dict, alphas: dict, rank: Optional[dict] = None) -> dict:
    r = rank or ranks(state)
    return {m: delta(t, float(alphas[m]) / r[m]) for m, t in modules(state).items()}


def peft_state(mods: dict) -> dict:
    return {f"{PEFT_PREFIX}{m}.{p}": v for m, t in mods.items() for p, v in t.items()}


def fold(state: dict, alphas: dict, rank: dict) -> tuple[dict, dict]:
    """(state with the scale alpha/r multiplied into one factor, alphas = r): the same weights at scale 1.
    The DoRA magnitude stays: it is not scaled by alpha."""
    first = {"lora": "lora_B.weight", "dora": "lora_B.weight", "loha": "hada_w1_a"}.get(adapter_of(state))
    mods = modules(state)
    for m, t in mods.items():
        part = first or ("lokr_w1" if "lokr_w1" in t else "lokr_w1_a")
        t[part] = t[part] * (float(alphas[m]) / rank[m])
    return peft_state(mods), {m: float(rank[m]) for m in mods}


def lokr_factor(t: dict, out: int, inp: int) -> int:
    """peft's ``decompose_factor`` that gives these LoKr shapes (-1: its default factorization)."""
    from peft.tuners.lokr.layer import factorization

    a, b = _w(t, 1).shape
    if (factorization(out)[0], factorization(inp)[0]) == (a, b):
        return -1
    if a == b and out % a == 0 and inp % a == 0:
        return a
    raise LoraError(f"a LoKr with w1 {a}x{b} on a {out}x{inp} layer is not a factorization peft builds "
                    f"(its default, or one decompose_factor for both sides); re-export it with peft's defaults")


def peft_config(kind: str, target_modules: list, r: int, alpha: float, dropout: float = 0.0,
                rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None, **lokr):
    """peft's own config of this adapter type. ``dropout``: LoRA/DoRA's input dropout; LoHa and LoKr
    have none, so it becomes their rank dropout (whole rank components dropped while training)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = dict(r=int(r), target_modules=list(target_modules), rank_pattern=rank_pattern or {},
                  alpha_pattern=alpha_pattern or {})
    if kind in ("lora", "dora"):
        return LoraConfig(lora_alpha=float(alpha), lora_dropout=float(dropout), init_lora_weights=True,
                          use_dora=kind == "dora", **common)
    if kind == "loha":
        return LoHaConfig(alpha=float(alpha), rank_dropout=float(dropout), init_weights=True, **common)
    if kind == "lokr":
        return LoKrConfig(alpha=float(alpha), rank_dropout=float(dropout), init_weights=True, **common, **lokr)
    raise LoraError(f"adapter type {kind!r} is not one of {', '.join(ADAPTER_PARTS)}")


def config_for(state: dict, rank: dict, alphas: dict, where: str = ""):
    """The peft config that takes ``state`` as it is (exact module names, per-module r and alpha)."""
    from .state import _lora_config_kwargs

    kw = _lora_config_kwargs(rank, alphas)
    kind, lokr = adapter_of(state), {}
    if kind == "lokr":
        mods, dims = modules(state, where), shapes(state, where)
        options = {(lokr_factor(t, *dims[m]), "lokr_w1_a" in t) for m, t in mods.items()}
        if len(options) != 1:
            raise LoraError(f"{where}the LoKr modules were built with different factorizations {sorted(options)}; "
                            f"peft takes one decompose_factor and decompose_both for all")
        (factor, both), = options
        lokr = {"decompose_factor": factor, "decompose_both": both}
    return peft_config(kind, kw["target_modules"], kw["r"], kw["lora_alpha"], rank_pattern=kw["rank_pattern"],
                       alpha_pattern=kw["alpha_pattern"], **lokr)


def merge_to_lora(state: dict, alphas: dict, where: str = "") -> tuple[dict, dict]:
    """A LoHa or LoKr as the plain LoRA with exactly its ΔW (what the official layout can hold):
    (w1_a·w1_b) ⊙ (w2_a·w2_b) = (w1_a •row w2_a)·(w1_b •col w2_b), rank r²; kron(U1·V1, U2·V2) =
    kron(U1, U2)·kron(V1, V2), rank rank(w1)·rank(w2) (the smaller side of a whole factor). The scale is
    folded in (alpha = rank). A DoRA is refused: its weight is normalised by the base weight's row norms,
    not a product of small factors, so no low-rank LoRA equals it."""
    kind = adapter_of(state)
    if kind == "lora":
        return state, alphas
    if kind == "dora":
        raise LoraError(f"{where}a DoRA cannot be merged into a plain LoRA exactly: its weight m·(W+ΔW)/‖W+ΔW‖ "
                        f"rescales every output row by a factor set by the base weight, which no low-rank ΔW "
                        f"reproduces. Export it in the peft or comfy layout instead")
    rank, mods = ranks(state), {}
    for m, t in modules(state, where).items():
        s = float(alphas[m]) / rank[m]
        if kind == "loha":
            B = (t["hada_w1_a"][:, :, None] * t["hada_w2_a"][:, None, :]).flatten(1)
            A = (t["hada_w1_b"][:, None, :] * t["hada_w2_b"][None, :, :]).flatten(0, 1)
        else:
            (U1, V1), (U2, V2) = _two_factors(t, 1), _two_factors(t, 2)
            B, A = torch.kron(U1, U2), torch.kron(V1, V2)
        mods[m] = {"lora_A.weight": A.contiguous(), "lora_B.weight": (B * s).contiguous()}
    merged = peft_state(mods)
    return merged, {m: float(r) for m, r in ranks(merged).items()}


def _two_factors(t: dict, i: int) -> tuple:
    """LoKr factor w_i as U·V with the fewest inner columns."""
    if f"lokr_w{i}" not in t:
        return t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
    w = t[f"lokr_w{i}"]
    a, b = w.shape
    return (w, torch.eye(b, dtype=w.dtype)) if b <= a else (torch.eye(a, dtype=w.dtype), w)


def require_lora(state: dict, layout: str, where: str = "") -> None:
    """Refuse a non-LoRA adapter for a layout that holds plain LoRAs only, saying what can be done."""
    kind = adapter_of(state)
    if kind == "lora":
        return
    r = max(ranks(state).values())
    offer = {"loha": f"lora.merge_to_lora(state, alphas) turns a LoHa into the plain LoRA with exactly its ΔW "
                     f"(rank r² = {r * r}: the Hadamard product of two rank-{r} products), which this layout takes",
             "lokr": "lora.merge_to_lora(state, alphas) turns a LoKr into the plain LoRA with exactly its ΔW (rank "
                     "rank(w1)·rank(w2): a Kronecker product of two factors), which this layout takes",
             "dora": "no merge is offered: a DoRA's weight m·(W+ΔW)/‖W+ΔW‖ rescales each output row by a factor "
                     "set by the base weight, so no plain LoRA equals it"}[kind]
    raise LoraError(f"{where}the {layout} layout holds plain LoRAs only (lora_down/lora_up) and this adapter is a "
                    f"{kind}: {offer}. Or export it in the peft or comfy layout (export_formats='peft'/'comfy'), "
                    f"which keep the {kind} as it is")
