"""The cache: hit/miss/invalidation, resume after a kill, damaged files, orphans, encoder identity."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from longcat_nb.cache import CacheError, CachedDataset, build_cache, load_negative, read_manifest
from longcat_nb.config import update_section
from helpers import make_run


def tensors(run_dir):
    out = {}
    for p in sorted((run_dir / "cache").rglob("*.safetensors")):
        out[str(p.relative_to(run_dir))] = {n: t.clone() for n, t in load_file(str(p)).items()}
    return out


@pytest.fixture()
def run(tmp_path, tiny_ckpt):
    make_run(tmp_path / "run", tiny_ckpt)
    return tmp_path / "run"


def test_hit_miss_invalidation_and_items(run):
    r1 = build_cache(run)
    assert r1.encoded == 4 and r1.skipped == 0 and not r1.failed
    r2 = build_cache(run)
    assert r2.encoded == 0 and r2.skipped == 4
    ds = CachedDataset(run)
    item = next(ds[i] for i in range(len(ds)) if ds[i]["num_cond_latents"])
    assert item["latents"].shape[:2] == (16, 3) and item["cond_latents"].shape[1] == 1
    assert item["text_embeds"].shape == (1, 512, 32) and item["text_mask"].sum() > 1
    neg, mask = load_negative(run)
    assert int(mask.sum()) == 1
    # a caption change re-encodes exactly that entry
    lines = (run / "dataset.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["caption"] = rec["caption"] + " Slow motion."
    lines[0] = json.dumps(rec, ensure_ascii=False)
    (run / "dataset.jsonl").write_text("\n".join(lines) + "\n")
    r3 = build_cache(run)
    assert r3.encoded == 1 and r3.skipped == 3 and len(r3.orphans) == 1
    # orphans are reported, removed only on request
    update_section(run, "cache", remove_orphans=True)
    r4 = build_cache(run)
    assert len(r4.removed) == 1 and r4.skipped == 4
    # a setting change (stored dtype) invalidates everything
    update_section(run, "cache", latent_dtype="float32", remove_orphans=False)
    assert build_cache(run).encoded == 4


def test_truncated_file_is_detected_and_remade(run):
    build_cache(run)
    before = tensors(run)
    f = sorted((run / "cache" / "latents").glob("*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    ds = CachedDataset(run)
    with pytest.raises(CacheError, match="re-run 02_cache"):
        ds[ds.keys.index(f.stem)]  # never silently read
    res = build_cache(run)
    assert res.remade == 1 and res.encoded == 1
    after = tensors(run)
    assert all(torch.equal(before[k][n], after[k][n]) for k in before for n in before[k])


def test_kill_mid_run_then_resume_is_identical(run, tmp_path, tiny_ckpt):
    ref_dir = tmp_path / "ref"
    shutil.copytree(run, ref_dir)
    build_cache(ref_dir)
    # a separate process killed after the second latent is written
    code = (
        "import os, sys\n"
        "import longcat_nb.cache as c\n"
        "orig = c.atomic_save_safetensors\n"
        "n = {'k': 0}\n"
        "def save(path, t, metadata=None):\n"
        "    out = orig(path, t, metadata)\n"
        "    if '/latents/' in str(path):\n"
        "        n['k'] += 1\n"
        "        if n['k'] == 2: os._exit(9)\n"
        "    return out\n"
        "c.atomic_save_safetensors = save\n"
        f"c.build_cache({str(run)!r})\n"
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    partial = read_manifest(run)
    assert len(partial["entries"]) == 1  # the second file was written but not yet recorded
    res = build_cache(run)
    assert res.skipped == 1 and res.encoded == 3
    a, b = tensors(ref_dir), tensors(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_encoder_mismatch_is_refused(run):
    build_cache(run)
    update_section(run, "cache", text_encoder="qwen2.5-vl")
    with pytest.raises(CacheError, match="never mixed"):
        CachedDataset(run)
