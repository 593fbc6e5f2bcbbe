"""Prompts: cleaning and encoding with the checkpoint's UMT5 text encoder (spec §6)."""
from __future__ import annotations

import html
import re
from typing import Optional, Sequence

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
