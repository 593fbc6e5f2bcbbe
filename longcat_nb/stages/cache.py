"""02_cache without Jupyter: VAE latents and text embeddings of dataset.jsonl, resumable."""
from __future__ import annotations

from . import apply_settings, split_parameters


def run(run_dir, params: dict, log=print) -> dict:
    from ..cache import build_cache

    sections, _ = split_parameters("cache", params)
    apply_settings(run_dir, sections)
    res = build_cache(run_dir, log=log)
    for f in res.failed:
        log(f"failed: {f}")
    return {"cache": res.table(), "failed": len(res.failed)}
