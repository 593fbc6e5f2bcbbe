"""The cache manifest is written in batches (a kill loses at most the batch; the resumed build is bit-identical),
and a damaged cache file stops training before its first step, named with the fix."""
import pytest

import longcat_nb.cache as C
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
