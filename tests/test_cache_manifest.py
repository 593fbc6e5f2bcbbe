"""The cache manifest is written in batches (a kill loses at most the batch; the resumed build is bit-identical),
and a damaged cache file stops training before its first step, named with the fix."""
import numpy as np
import pytest
import torch

import longcat_nb.cache_manifest as C
from longcat_nb.cache import CacheError, build_cache, read_manifest
from longcat_nb.config import update_section
from test_cache import QUIET, run  # noqa: F401  (run is a fixture)


def count_manifest_writes(monkeypatch) -> list:
    writes, orig = [], C.atomic_write_text

    def counted(path, text):
        if str(path).endswith("manifest.json"):
            writes.append(len(text))
        return orig(path, text)

    monkeypatch.setattr(C, "atomic_write_text", counted)
    return writes


@pytest.mark.parametrize("every, want", [(50, 4), (2, 7)])
def test_manifest_writes_are_batched(run, monkeypatch, every, want):
    """9 files (5 captions with the empty negative, 4 clips): one write before, one per full batch, one at
    each phase's end (if anything is new) and one at the end; rewritten after every file it was 1 + 9 + 1."""
    monkeypatch.setattr(C, "MANIFEST_EVERY_FILES", every)
    writes = count_manifest_writes(monkeypatch)
    r = build_cache(run, **QUIET)
    assert (r.text_encoded, r.encoded) == (5, 4) and len(writes) == want
    m = read_manifest(run)
    assert m["complete"] and len(m["entries"]) == 4 and len(m["latents"]) == 4 and len(m["text"]) == 5


def test_a_time_batch_writes_when_files_come_slowly(tmp_path):
    (tmp_path / "cache").mkdir()
    w = C.ManifestWriter(tmp_path, {"entries": {}}, every=50, seconds=0.0)
    w.added()
    w.added()
    w.flush(only_pending=True)  # nothing new since the last write: no write
    assert w.writes == 2 and (tmp_path / "cache" / "manifest.json").exists()


def train_settings(run):
    update_section(run, "train", steps=2, rank=4, alpha=4, checkpoint_every=0, validate_every=0)


def test_a_damaged_cache_file_stops_training_before_the_first_step(run):
    from longcat_nb.train import train

    build_cache(run, **QUIET)
    train_settings(run)
    m = read_manifest(run)
    lat = sorted((run / "cache" / "latents").glob("*.safetensors"))
    good = lat[-1].read_bytes()
    lat[-1].write_bytes(good[:-100])  # truncated: found by size and header, always
    with pytest.raises(CacheError, match=rf"{lat[-1]} is damaged \(truncated.*re-run 02_cache, which re-makes"):
        train(run, log=lambda *a: None)
    assert not (run / "logs" / "train.jsonl").exists()
    data = bytearray(good)  # same size, one bit flipped in the tensor data: found by sha256 when asked
    data[-5] ^= 0x01
    lat[-1].write_bytes(bytes(data))
    neg = run / "cache" / m["text"][m["negative"]]["file"]
    data = bytearray(neg.read_bytes())
    data[-3] ^= 0x10
    neg.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{lat[-1]} is damaged \(sha256 differs.*; {neg} is damaged .*re-run 02_cache"):
        train(run, log=lambda *a: None, verify_cache=True)
    assert not (run / "logs" / "train.jsonl").exists() and not (run / "checkpoints").exists()
    assert C.verify_cache(run) == 9  # 4 clips, 5 captions; the cheap check reads only sizes and headers
    r = build_cache(run, **QUIET)  # the fix the message names
    assert (r.encoded, r.text_encoded) == (1, 1) and C.verify_cache(run, full=True) == 9


# ---------------------------------------------------------------------------------------------
# the cache's text encoder is the one validation and sampling use (a tiny random Qwen2.5-VL here)
# ---------------------------------------------------------------------------------------------
def test_a_qwen_cached_run_validates_and_samples_with_qwen_or_refuses(run, tmp_path, tiny_ckpt):
    from longcat_nb import lora as L
    from longcat_nb.lora import export as lora_export
    from longcat_nb.cache import load_negative
    from longcat_nb.model_files import load_components, load_dit, load_tokenizer
    from longcat_nb.config import load_config
    from longcat_nb.sampling import SampleRequest, compare_base_and_lora, encode_text, generate
    from longcat_nb.text import TextEncoderError, named_encoder
    from longcat_nb.train import Validator
    from test_cache import _tiny_qwen

    qwen = tmp_path / "qwen"
    _tiny_qwen(qwen, load_tokenizer(tiny_ckpt))
    update_section(run, "cache", text_encoder="qwen2.5-vl", qwen_path=str(qwen))
    build_cache(run, **QUIET)
    update_section(run, "train", validate_every=1, validation_prompts=["a red ball"], validation_height=64,
                   validation_width=64, validation_frames=9, validation_steps=2)
    # validation encodes its prompts as the captions were cached: the empty prompt is the cached negative
    v = Validator(run, load_config(run), save=False)
    neg, _ = load_negative(run)
    assert v.text_encoder["name"] == "qwen2.5-vl" and torch.equal(v.texts[0][0][0].to(neg.dtype), neg)
    # 04: a LoRA of this run says so in its header; compare_base_and_lora / generate encode with Qwen for it
    dit = load_dit(tiny_ckpt, "cpu", "float32")
    L.add_lora(dit, rank=2, alpha=2, init_seed=0)
    with torch.no_grad():
        for n, p in dit.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    lora = lora_export.save_trained(tmp_path / "q.safetensors", dit, lora_export.run_metadata(run, 1))
    comps = load_components(tiny_ckpt, device="cpu")
    req = SampleRequest("a red ball", height=64, width=64, num_frames=9, steps=2, seed=3)
    qwen_text = named_encoder(v.text_encoder, "cpu", torch.float32)(["", "a red ball"])
    want = generate(comps, req, [(lora, 1.0)], progress=False, text=qwen_text).video
    umt5 = generate(comps, req, [(lora, 1.0)], progress=False,
                    text=encode_text(comps, req.prompt, "", True, "cpu", torch.float32)).video
    assert not np.array_equal(want, umt5)
    assert np.array_equal(generate(comps, req, [(lora, 1.0)], progress=False).video, want)
    assert np.array_equal(compare_base_and_lora(comps, req, lora, progress=False)["lora"].video, want)
    # without the Qwen model both refuse, saying why (train start, not hours later; 04 before denoising)
    qwen.rename(tmp_path / "gone")
    with pytest.raises(TextEncoderError, match=r"validation .*qwen2.5-vl embeddings.*could not load Qwen2.5-VL"):
        Validator(run, load_config(run), save=False)
    with pytest.raises(TextEncoderError, match=r"sampling: the LoRA is trained on qwen2.5-vl.*not with UMT5"):
        generate(comps, req, [(lora, 1.0)], progress=False)
