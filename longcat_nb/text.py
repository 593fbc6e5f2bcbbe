"""Prompts: cleaning and encoding with the checkpoint's UMT5 text encoder (spec §6), or with the text
encoder a run's cache was built with (Qwen2.5-VL), which validation and sampling of its LoRAs must use."""
from __future__ import annotations

import html
import re
from typing import Callable, Optional, Sequence

import torch

MAX_TEXT_TOKENS = 512

# What the official demo scripts (run_demo_*.py) pass as negative prompt (English form of Wan's
# standard one). The pipeline's own default, when none is given, is the empty prompt.
OFFICIAL_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra "
    "fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, "
    "still picture, messy background, three legs, many people in the background, walking backwards"
)
NEGATIVE_CHOICES = {"": "", "official": OFFICIAL_NEGATIVE_PROMPT}  # named negative prompts


def resolve_negative_prompt(value: Optional[str]) -> str:
    """A negative prompt as given, or a named one: "" / None = the empty negative (the pipeline's
    default), "official" = OFFICIAL_NEGATIVE_PROMPT (what the official demos use)."""
    if value is None:
        return ""
    return NEGATIVE_CHOICES.get(value.strip().lower(), value) if isinstance(value, str) else value


def clean_prompt(text: str) -> str:
    """ftfy fix, HTML-unescape twice, collapse whitespace: exactly what the pipeline does."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a dependency; keep working without it rather than fail a caption
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def count_tokens(tokenizer, text: str) -> int:
    """Token count with special tokens (the EOS), the number that meets the 512 limit."""
    return len(tokenizer(clean_prompt(text), add_special_tokens=True)["input_ids"])


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], max_length: int = MAX_TEXT_TOKENS,
                   device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (embeddings [B, 1, L, C], mask [B, L] int64) in the form the DiT consumes."""
    prompts = [clean_prompt(p) for p in prompts]
    tok = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    enc_device = next(text_encoder.parameters()).device
    ids, mask = tok.input_ids.to(enc_device), tok.attention_mask.to(enc_device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    device = device or enc_device
    hidden = hidden.to(device=device, dtype=dtype or hidden.dtype)
    return hidden[:, None], mask.to(device)


# ---------------------------------------------------------------------------------------------
# which text encoder: the one the cache was built with (its manifest; a LoRA file's header copies it)
# ---------------------------------------------------------------------------------------------
UMT5 = "umt5"  # the checkpoint's own encoder, what components.text_encoder holds


def lora_text_encoder(path) -> Optional[dict]:
    """The text encoder a LoRA file was trained with ({"name", "source", "width", ...}, from its run's
    cache manifest, written by lora.export.run_metadata); None when the header does not say (UMT5)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            value = (f.metadata() or {}).get("text_encoder")
        enc = json.loads(value) if value else None
    except Exception:  # unreadable files are refused, with the reason, by the LoRA loader itself
        return None
    return enc if isinstance(enc, dict) and enc.get("name") else None


def required_encoder(paths) -> Optional[dict]:
    """The non-UMT5 text encoder the LoRA files ``paths`` need (None: UMT5 serves them all; files whose
    header does not say, e.g. the official ones, take what the others need). LoRAs trained on different
    encoders cannot share one prompt embedding: TextEncoderError naming them."""
    found = {str(p): enc for p in paths if (enc := lora_text_encoder(p)) is not None}  # unsaid: no constraint
    names = {enc["name"] for enc in found.values()}
    if len(names) > 1 or len({(e.get("source"), e.get("width")) for e in found.values() if e["name"] != UMT5}) > 1:
        listed = ", ".join(f"{p} ({e['name']} {e.get('source', '')})" for p, e in found.items())
        raise TextEncoderError(f"these LoRAs were trained on different text encoders and cannot be sampled together: "
                         f"{listed}; sample them one at a time")
    enc = next(iter(found.values()), None)
    return None if enc is None or enc["name"] == UMT5 else enc


class TextEncoderError(ValueError):
    """The text encoder a LoRA was trained with cannot be used (not available, or mixed with another)."""


def run_text_encoder(run_dir) -> Optional[dict]:
    """The text encoder of the run's cache (its manifest) when it is not UMT5; None for UMT5 or no cache."""
    from .cache_manifest import cache_text_encoder

    enc = cache_text_encoder(run_dir)
    return None if enc is None or enc["name"] == UMT5 else enc


def named_encoder(encoder: dict, device, dtype, what: str = "sampling") -> Callable:
    """encode(prompts) -> (embeddings [B, 1, 512, C], mask [B, 512]) with a cache's non-UMT5 encoder
    (Qwen2.5-VL from the source its manifest records), through the cache's own encode function, so
    prompts are encoded exactly as the captions were (padding zeroed, as the cache stores it). One that
    cannot be loaded is refused, naming ``what`` needed it: UMT5 embeddings would be out of distribution."""
    from .cache import _qwen_encoder

    why = f"text encoder {encoder['name']!r} is not one this kit knows (umt5, qwen2.5-vl)"
    if encoder["name"] == "qwen2.5-vl":
        try:
            one = _qwen_encoder(encoder["source"], torch.device(device), dtype, int(encoder["width"]))
            why = ""
        except Exception as e:  # the cache's CacheError names the download and the setting
            why = str(e)
    if why:
        raise TextEncoderError(f"{what}: the LoRA is trained on {encoder['name']} embeddings (its cache was built "
                               f"with {encoder.get('source') or encoder['name']}), so prompts must be encoded with "
                               f"it, not with UMT5, and it cannot be loaded: {why}")

    def encode(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [one(p) for p in prompts]
        emb = torch.stack([e * m[:, None].to(e.dtype) for e, m in pairs])[:, None]
        return emb, torch.stack([m for _, m in pairs])

    return encode
