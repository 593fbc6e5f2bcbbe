"""The cache: hits, misses and invalidation, resume after an interrupt and a kill (bit-identical), damaged
files, orphans, the encoder identity, the decode-back check and 02_cache headless."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

import longcat_nb.cache as C
from longcat_nb.cache import (CacheError, CachedDataset, build_cache, cache_summary, decode_check, load_negative,
                              read_manifest, source_identity)
from longcat_nb.config import update_section
from helpers import SAMPLES, make_run

QUIET = dict(log=lambda *a: None)


def files(run_dir) -> dict:
    """Every cache file's bytes (latents and text), by relative path."""
    return {str(p.relative_to(run_dir / "cache")): p.read_bytes()
            for sub in ("latents", "text") for p in sorted((run_dir / "cache" / sub).iterdir())}


def tables(run_dir) -> dict:
    m = read_manifest(run_dir)
    return {"entries": {k: (e["latents"], e["text"]) for k, e in m["entries"].items()}, "negative": m["negative"],
            "files": {t: {k: i["sha256"] for k, i in m[t].items()} for t in ("latents", "text")}}


def rewrite_dataset(run_dir, edit):
    path = run_dir / "dataset.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    recs = edit(recs)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))


@pytest.fixture()
def run(tmp_path, tiny_ckpt):
    data = tmp_path / "data"  # a private copy: tests touch source files
    shutil.copytree(SAMPLES, data, ignore=shutil.ignore_patterns("*.py"))
    make_run(tmp_path / "run", tiny_ckpt, dataset_dir=str(data))
    return tmp_path / "run"


def test_hit_then_items_as_the_trainer_reads_them(run, tiny_ckpt):
    from longcat_nb.model_files import load_text_encoder, load_tokenizer
    from longcat_nb.text import encode_prompts

    r1 = build_cache(run, **QUIET)
    assert (r1.entries, r1.cached, r1.encoded, r1.text_encoded, r1.skipped) == (4, 4, 4, 5, 0)  # 4 captions + ""
    assert not r1.failed and not r1.orphans and not r1.damaged
    assert 0.85 < r1.bytes_on_disk / r1.estimated_bytes < 1.15  # the estimate comes from the latent shapes
    before = files(run)
    r2 = build_cache(run, **QUIET)
    assert (r2.encoded, r2.text_encoded, r2.skipped, r2.stale) == (0, 0, 4, 0)
    assert files(run) == before

    ds = CachedDataset(run)
    assert len(ds) == 4 and sorted(i for v in ds.buckets().values() for i in v) == [0, 1, 2, 3]
    recs = [json.loads(l) for l in (run / "dataset.jsonl").read_text().splitlines()]
    tok, enc = load_tokenizer(tiny_ckpt), load_text_encoder(tiny_ckpt)
    for i, rec in enumerate(recs):  # dataset.jsonl order
        it = ds[i]
        assert it["caption"] == rec["caption"] and it["bucket"] == rec["bucket"]
        assert it["latents"].dtype == torch.float32 and it["latents"].shape == (16, 3, rec["height"] // 8, rec["width"] // 8)
        assert it["text_embeds"].shape == (1, 512, 32) and it["text_mask"].dtype == torch.int64
        # the real tokens are UMT5's output (stored bf16); the padding is zero (the DiT ignores it)
        emb, mask = encode_prompts(tok, enc, [rec["caption"]])
        assert torch.equal(it["text_mask"], mask[0])
        keep = mask[0].bool()
        assert torch.equal(it["text_embeds"][0, keep], emb[0, 0, keep].to(torch.bfloat16).float())
        assert not it["text_embeds"][0, ~keep].any()
        i2v = bool(rec["condition_image"])
        assert it["num_cond_latents"] == int(i2v) and (it["cond_latents"] is not None) == i2v
        if i2v:
            assert it["cond_latents"].shape == (16, 1) + it["latents"].shape[2:]
    neg, neg_mask = load_negative(run)
    assert neg.shape == (1, 512, 32) and int(neg_mask.sum()) == 1  # "" = one EOS token
    rows = cache_summary(run)
    assert rows[-1]["bucket"] == "total" and rows[-1]["entries"] == 4 and rows[-1]["i2v"] == 1


def test_invalidation_by_caption_file_and_setting_and_orphans(run):
    build_cache(run, **QUIET)
    first = tables(run)
    # caption edit: that caption is re-encoded, its clip's latents are reused, the old caption is an orphan
    rewrite_dataset(run, lambda rs: [dict(r, caption=r["caption"] + " Slow motion.") if i == 0 else r
                                     for i, r in enumerate(rs)])
    r = build_cache(run, **QUIET)
    assert (r.stale, r.text_encoded, r.encoded, r.skipped) == (1, 1, 0, 3)
    assert [o["kind"] for o in r.orphans] == ["text"] and (run / "cache" / r.orphans[0]["file"]).exists()
    assert set(tables(run)["files"]["latents"]) == set(first["files"]["latents"])
    # a source file changed (new mtime): only that clip is re-encoded
    src = json.loads((run / "dataset.jsonl").read_text().splitlines()[1])["file"]
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = build_cache(run, **QUIET)
    assert (r.stale, r.encoded, r.text_encoded) == (1, 1, 0) and len(r.orphans) == 2
    # a dropped sample: its files become orphans, reported and kept ...
    rewrite_dataset(run, lambda rs: rs[:-1])
    stray = run / "cache" / "latents" / "0123abcd.safetensors"
    stray.write_bytes(b"not ours")
    r = build_cache(run, **QUIET)
    kinds = sorted(o["kind"] for o in r.orphans)
    assert kinds == ["latents", "latents", "text", "text", "untracked"] and not r.removed
    assert all((run / "cache" / o["file"]).exists() for o in r.orphans) and len(CachedDataset(run)) == 3
    # ... and deleted only on request
    update_section(run, "cache", remove_orphans=True)
    r = build_cache(run, **QUIET)
    assert len(r.removed) == 5 and not r.orphans and not stray.exists()
    assert not any((run / "cache" / f).exists() for f in r.removed)
    assert (r.skipped, r.encoded, r.text_encoded) == (3, 0, 0) and len(CachedDataset(run)) == 3
    # a setting that changes the tensors (stored dtype) re-encodes everything; the reader follows the setting
    update_section(run, "cache", latent_dtype="float32")
    with pytest.raises(CacheError, match="latent_dtype='bfloat16'.*re-run 02_cache"):
        CachedDataset(run)
    r = build_cache(run, **QUIET)
    assert (r.encoded, r.text_encoded, r.skipped) == (3, 4, 0)
    assert CachedDataset(run, dtype=None)[0]["latents"].dtype == torch.float32


def test_source_identity_sees_content_with_same_size_and_mtime(tmp_path):
    f = tmp_path / "clip.bin"
    f.write_bytes(b"a" * 5000)
    st = os.stat(f)
    a = source_identity(f)
    f.write_bytes(b"b" + b"a" * 4999)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert source_identity(f)["mtime_ns"] == a["mtime_ns"] and source_identity(f) != a


KILL = """
import os, signal, sys
import longcat_nb.cache as c
from longcat_nb.io import atomic_write
orig, n = c.atomic_save_safetensors, [0]
def save(path, tensors, metadata=None):
    out = orig(path, tensors, metadata)
    if "/latents/" in str(path):
        n[0] += 1
        if n[0] == 2:  # file 2 is on disk but not in the manifest; file 3 is half written; then SIGKILL
            def half(tmp):
                open(tmp, "wb").write(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            atomic_write(str(path) + ".next", half)
    return out
c.atomic_save_safetensors = save
c.build_cache(sys.argv[1], log=lambda *a: None)
"""


def test_interrupt_and_kill_then_resume_is_bit_identical(run, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    build_cache(ref, **QUIET)
    # 1) an interrupt (the notebook's stop button) during the text phase
    orig, n = C.atomic_save_safetensors, [0]

    def interrupt(path, tensors, metadata=None):
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt
        return orig(path, tensors, metadata)

    monkeypatch.setattr(C, "atomic_save_safetensors", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_cache(run, **QUIET)
    monkeypatch.setattr(C, "atomic_save_safetensors", orig)
    assert not read_manifest(run)["complete"] and len(read_manifest(run)["text"]) == 2
    assert not (run / "cache" / ".lock").exists()
    with pytest.raises(CacheError, match="did not finish"):
        CachedDataset(run)
    # 2) resumed in another process that is SIGKILLed while writing latents
    proc = subprocess.run([sys.executable, "-c", KILL, str(run)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    m = read_manifest(run)  # written in batches: the kill loses the latents since the text phase's last write
    assert not m["complete"] and len(m["latents"]) == 0 and len(m["text"]) == 5
    assert len(list((run / "cache" / "latents").glob("*.safetensors"))) == 2  # one untracked
    assert list((run / "cache" / "latents").glob(".*.tmp"))  # a half-written temporary file
    assert json.loads((run / "cache" / ".lock").read_text())["pid"] != os.getpid()  # the dead build's lock
    # 3) resumed to the end: the same files, bit for bit, as the uninterrupted build
    r = build_cache(run, **QUIET)
    assert r.encoded == 4 and r.temp_removed == 1 and not r.orphans and not r.failed
    assert files(run) == files(ref) and tables(run) == tables(ref)
    assert not list((run / "cache").rglob("*.tmp")) and not (run / "cache" / ".lock").exists()


def test_a_live_build_lock_is_respected(run):
    (run / "cache").mkdir()
    (run / "cache" / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(CacheError, match="another cache build"):
        build_cache(run, **QUIET)


def test_damaged_files_are_refused_then_remade(run):
    build_cache(run, **QUIET)
    before = files(run)
    m = read_manifest(run)
    lat = sorted((run / "cache" / "latents").glob("*.safetensors"))
    txt = run / "cache" / m["text"][m["negative"]]["file"]
    lat[0].write_bytes(lat[0].read_bytes()[:-100])  # truncated
    with pytest.raises(CacheError, match=f"{lat[0].name} is damaged .*truncated.*re-run 02_cache"):
        CachedDataset(run)
    lat[0].write_bytes(before[f"latents/{lat[0].name}"])
    data = bytearray(lat[1].read_bytes())  # same size, one bit flipped in the tensor data
    data[-5] ^= 0x01
    lat[1].write_bytes(bytes(data))
    data = bytearray(txt.read_bytes())
    data[-3] ^= 0x10
    txt.write_bytes(bytes(data))
    ds = CachedDataset(run)  # headers are fine ...
    bad = next(i for i in range(len(ds)) if m["latents"][ds.entry_meta(i)["latents"]]["file"].endswith(lat[1].name))
    with pytest.raises(CacheError, match="sha256 mismatch"):  # ... but the checksum is checked on read
        ds[bad]
    with pytest.raises(CacheError, match="sha256 mismatch"):
        load_negative(run)
    r = build_cache(run, **QUIET)
    assert sorted(d["reason"] for d in r.damaged) == ["sha256 differs from the manifest (corrupted)"] * 2
    assert (r.encoded, r.text_encoded) == (1, 1) and files(run) == before
    (run / "cache" / "manifest.json").write_text("{broken")
    with pytest.raises(CacheError, match="manifest.json is damaged"):
        CachedDataset(run)
    r = build_cache(run, **QUIET)  # starts afresh, deterministically
    assert r.encoded == 4 and files(run) == before


def _tiny_qwen(path, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[0]),
        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_encoders_are_never_mixed(run, tmp_path, tiny_ckpt):
    from longcat_nb.model_files import load_tokenizer

    build_cache(run, **QUIET)
    latents = tables(run)["files"]["latents"]
    update_section(run, "cache", text_encoder="qwen2.5-vl")
    with pytest.raises(CacheError, match="built with text encoder 'umt5'.*never mixed"):
        CachedDataset(run)
    # the Qwen2.5-VL path (a tiny random one here): hidden states zero-padded to the DiT's caption width
    _tiny_qwen(tmp_path / "qwen", load_tokenizer(tiny_ckpt))
    update_section(run, "cache", qwen_path=str(tmp_path / "qwen"))
    r = build_cache(run, **QUIET)
    assert (r.text_encoded, r.encoded) == (5, 0) and tables(run)["files"]["latents"].keys() >= latents.keys()
    assert sorted({o["kind"] for o in r.orphans}) == ["text"] and len(r.orphans) == 5  # the UMT5 embeddings
    it = CachedDataset(run)[0]
    keep = it["text_mask"].bool()
    assert it["text_embeds"].shape == (1, 512, 32) and it["text_embeds"][0, keep, :16].abs().sum() > 0
    assert not it["text_embeds"][0, :, 16:].any()
    update_section(run, "cache", text_encoder="umt5")
    with pytest.raises(CacheError, match="built with text encoder 'qwen2.5-vl'.*never mixed"):
        CachedDataset(run)
    update_section(run, "cache", text_encoder="qwen2.5-vl", qwen_path=str(tmp_path / "nowhere"))
    with pytest.raises(CacheError, match="could not load Qwen2.5-VL.*qwen_path"):
        build_cache(run, **QUIET)


def test_decode_back_matches_the_vae_and_i2v_layout(run, tiny_ckpt):
    from longcat_nb.model_files import load_vae
    from longcat_nb.data import load_condition_image, load_sample_frames
    from longcat_nb.vae import decode_latents, encode_video, from_uint8_frames, to_uint8_frames

    update_section(run, "cache", posterior="mode", latent_dtype="float32")
    build_cache(run, **QUIET)
    ds = CachedDataset(run)
    i = next(i for i in range(len(ds)) if ds.entry_meta(i)["num_cond_latents"])
    rec, item = ds.entry_meta(i)["record"], ds[i]
    vae = load_vae(tiny_ckpt)
    frames = load_sample_frames(rec)
    z = encode_video(vae, from_uint8_frames(frames), sample=False)[0]
    assert torch.equal(item["latents"], z)  # exactly what the VAE gives for the frames as trained
    # I2V: latents frame 0 is the causal VAE's encoding of pixel frame 0 alone; cond_latents is the image
    first = encode_video(vae, from_uint8_frames(frames[:1]), sample=False)[0]
    assert torch.allclose(item["latents"][:, :1], first, atol=1e-5)
    img = encode_video(vae, from_uint8_frames(load_condition_image(rec)), sample=False)[0]
    assert torch.equal(item["cond_latents"], img)
    check = decode_check(run, index=i)
    assert check["source"].shape == check["decoded"].shape == frames.shape and (check["source"] == frames).all()
    assert (check["decoded"] == to_uint8_frames(decode_latents(vae, z[None]))[0]).all()
    assert check["cond_decoded"].shape == (1,) + frames.shape[1:] and 0 <= check["mae"] <= 255


def test_02_cache_notebook_headless(tmp_path, tiny_ckpt):
    from longcat_nb.runner import run_notebooks

    params = dict(dataset_dir=str(SAMPLES), num_frames=9, resolution="64x64", preview_count=1)
    outs = run_notebooks(["01_dataset", "02_cache"], tmp_path, params, log=lambda *a: None)
    nb = json.loads(outs[-1].read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[:1]
    text = json.dumps(nb["cells"])
    assert "Cache build" in text and "Cached entries per bucket" in text and "PSNR" in text
    assert "image/gif" in text or "text/html" in text  # the inline side-by-side clips
    assert len(CachedDataset(tmp_path)) == 4 and outs[-1].stat().st_size < 1_000_000


def _refused_run(run_dir, ckpt):
    """A run whose 01_dataset found only clips below min_frames: dataset_problems.json, no dataset.jsonl."""
    from longcat_nb.data import EmptyDatasetError

    with pytest.raises(EmptyDatasetError):
        make_run(run_dir, ckpt, num_frames=93, min_frames=61)
    assert not (run_dir / "dataset.jsonl").exists()


def test_an_empty_dataset_is_refused_before_any_model_with_01s_problems(tmp_path, tiny_ckpt):
    import longcat_nb.train as T
    from longcat_nb.data import EmptyDatasetError

    run = tmp_path / "run"
    _refused_run(run, tiny_ckpt)
    with pytest.raises(EmptyDatasetError) as err:
        build_cache(run, **QUIET)
    msg = str(err.value)
    assert "dataset.jsonl does not exist: 01_dataset found no usable sample" in msg
    assert str(run / "dataset_problems.json") in msg and "too short (4 files), shortest" in msg
    assert "lower min_frames (e.g. 37)" in msg and "re-run 01_dataset" in msg
    assert not (run / "cache").exists()  # refused before the cache folder, the text encoder or the VAE
    (run / "dataset.jsonl").write_text("")  # what an older kit wrote for an empty scan
    with pytest.raises(EmptyDatasetError, match="(?s)dataset.jsonl holds no samples; its problems .*too short"):
        build_cache(run, **QUIET)
    # the trainer and the decode check trace "no cache entries" back to the same cause
    with pytest.raises(CacheError, match="(?s)nothing to train on: .*dataset.jsonl holds no samples.*too short"):
        T.train(run, log=lambda *a: None)
    (run / "dataset_problems.json").unlink()
    (run / "dataset.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="dataset.jsonl does not exist: run 01_dataset first"):
        build_cache(run, **QUIET)


def test_02_cache_notebook_stops_with_01s_problems(tmp_path, tiny_ckpt):
    from papermill.exceptions import PapermillExecutionError

    from longcat_nb.runner import run_notebooks

    _refused_run(tmp_path, tiny_ckpt)
    with pytest.raises(PapermillExecutionError) as err:
        run_notebooks(["02_cache"], tmp_path, {}, log=lambda *a: None)
    assert err.value.ename == "EmptyDatasetError" and "01_dataset found no usable sample" in err.value.evalue
    assert "too short" in err.value.evalue and not (tmp_path / "cache").exists()


def test_cache_and_train_batches_of_two_frame_counts(tmp_path, tiny_ckpt):
    """Short clips kept at their own length: 5-frame and 9-frame samples are cached at their own latent
    length and trained in batches of one bucket each (two short clips share a batch)."""
    import numpy as np

    import longcat_nb.train as T
    from longcat_nb.data.video import write_mp4

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLES / "green_square_spin.mp4", data)  # 45 frames at 15 fps: 9 with num_frames=9
    shutil.copy(SAMPLES / "green_square_spin.txt", data)
    for k, colour in enumerate([(200, 30, 30), (30, 30, 200)]):  # 12 frames at 30 fps: 6 at 15 -> 5
        frames = np.zeros((12, 64, 64, 3), np.uint8)
        for i in range(12):
            frames[i, :, : 4 + 5 * i] = colour
        write_mp4(data / f"wipe{k}.mp4", frames, fps=30)
        (data / f"wipe{k}.txt").write_text(f"A colour wipe, take {k}.")
    run = tmp_path / "run"
    rep = make_run(run, tiny_ckpt, dataset_dir=str(data), min_frames=5)
    assert sorted(r["bucket"] for r in rep.records) == ["64x64@5", "64x64@5", "64x64@9"] and not rep.problems
    res = build_cache(run, **QUIET)
    assert res.cached == 3 and not res.failed
    ds = CachedDataset(run)
    shapes = {ds[i]["bucket"]: tuple(ds[i]["latents"].shape) for i in range(len(ds))}
    assert shapes == {"64x64@5": (16, 2, 8, 8), "64x64@9": (16, 3, 8, 8)}  # 1 + (F - 1) / 4 latent frames
    groups = T.group_by_shape(ds)
    assert sorted(len(v) for v in groups.values()) == [1, 2]
    update_section(run, "train", steps=2, rank=4, alpha=4, lr=1e-3, batch_size=2, checkpoint_every=0, seed=0)
    out = T.train(run, log=lambda *a: None)  # one epoch: the 2-clip batch of 5 frames and the 9-frame one
    assert out.steps == 2 and all(np.isfinite(out.losses)) and out.lora_path.exists()
