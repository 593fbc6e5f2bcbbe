"""Dataset scan: every problem kind is named with its file and fix; windows, buckets; folder untouched."""
import hashlib
from fractions import Fraction
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from longcat_nb.config import DatasetSettings
from longcat_nb.data import scan_dataset, write_dataset_jsonl
from longcat_nb.data.buckets import BucketError, aspect_buckets, assign_bucket, crop_loss, parse_resolution
from longcat_nb.data.video import load_sample_frames, probe, resample_indices, window_starts

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"


def write_clip(path, n=30, h=48, w=64, fps=30, pts_step=None, rotate=None):
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotate is not None:
            s.metadata["rotate"] = str(rotate)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), (i * 7) % 255, np.uint8), format="rgb24")
            if pts_step is not None:
                f.pts = sum(pts_step[: i]) if isinstance(pts_step, list) else i * pts_step
                f.time_base = Fraction(1, fps)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def folder_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    write_clip(d / "good.mp4", n=40)
    (d / "good.txt").write_text("A good clip of a grey square.")
    write_clip(d / "short.mp4", n=6)
    (d / "short.txt").write_text("Too short.")
    shutil.copy(d / "good.mp4", d / "copy.mp4")
    (d / "copy.txt").write_text("Same bytes as good.")
    (d / "empty.mp4").write_bytes(b"")
    (d / "empty.txt").write_text("zero bytes")
    (d / "corrupt.mp4").write_bytes((d / "good.mp4").read_bytes()[:2000])
    (d / "corrupt.txt").write_text("truncated")
    (d / "notes.pdf").write_bytes(b"%PDF-1.4 not a video")
    write_clip(d / "nocap.mp4", n=40, h=32)
    write_clip(d / "emptycap.mp4", n=40, h=40)
    (d / "emptycap.txt").write_text("   \n")
    write_clip(d / "latin1.mp4", n=40, h=56)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    write_clip(d / "long.mp4", n=40, h=64)
    (d / "long.txt").write_text("word " * 600)
    write_clip(d / "vfr.mp4", n=40, w=80, pts_step=[1 if i % 2 else 3 for i in range(40)], fps=30)
    (d / "vfr.txt").write_text("Variable frame rate clip.")
    return d


def test_every_problem_kind_named_with_file_and_fix(mixed, tiny_ckpt):
    from longcat_nb.checkpoint import load_tokenizer

    before = folder_digest(mixed)
    rep = scan_dataset(mixed, DatasetSettings(num_frames=9, resolution="64x64"), load_tokenizer(tiny_ckpt))
    by_file = {Path(p.file).name: p for p in rep.problems}
    dup = [n for n in ("copy.mp4", "good.mp4") if n in by_file]
    assert len(dup) == 1 and by_file[dup[0]].kind == "duplicate"
    expect = {"short.mp4": "too short", "empty.mp4": "empty file",
              "corrupt.mp4": "corrupt video", "notes.pdf": "not a video", "nocap.*": "missing caption",
              "emptycap.txt": "empty caption", "latin1.txt": "caption is not UTF-8", "long.txt": "caption too long",
              "vfr.mp4": "variable frame rate"}
    for name, kind in expect.items():
        assert name in by_file and by_file[name].kind == kind, (name, by_file.get(name))
        assert by_file[name].fix
    files = {Path(r["file"]).name for r in rep.records}
    assert files == ({"good.mp4", "copy.mp4"} - set(dup)) | {"vfr.mp4"}
    write_dataset_jsonl(mixed.parent / "run", rep)
    lines = (mixed.parent / "run" / "dataset.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert {"file", "caption", "condition_image", "source_fps", "frame_indices", "bucket", "problems"} <= set(rec)
    assert folder_digest(mixed) == before  # nothing in the dataset folder changed


def test_samples_folder_scans_clean_with_i2v_image(tiny_ckpt):
    from longcat_nb.checkpoint import load_tokenizer

    rep = scan_dataset(SAMPLES, DatasetSettings(num_frames=9, resolution="64x64"), load_tokenizer(tiny_ckpt))
    assert not rep.problems and len(rep.records) == 4
    red = next(r for r in rep.records if "red_ball" in r["file"])
    assert red["condition_image"].endswith("red_ball_bounce.png")
    assert any(ord(c) > 0x4E00 for r in rep.records for c in r["caption"])  # Chinese captions tokenized
    frames = load_sample_frames(red)
    assert frames.shape == (9, red["height"], red["width"], 3)


def test_frame_windows_and_resampling():
    assert resample_indices(5, 30.0, 15.0) == [0, 2, 4, 6, 8]
    assert resample_indices(3, 24.0, 30.0) == [0, 1, 2]  # never upsample: take frames as they are
    assert window_starts(100, 93, "head") == [0]
    assert window_starts(100, 93, "uniform", windows=3) == [0, 4, 7]
    assert window_starts(30, 9, "slide", stride=10) == [0, 10, 20]
    assert window_starts(8, 9) == []


def test_buckets_and_bad_settings():
    bs = aspect_buckets("480x832")
    assert (480, 832) in bs and (832, 480) in bs and all(h % 32 == 0 or h == 480 for h, w in bs)
    s = DatasetSettings()
    assert assign_bucket(1080, 1920, 93, s).key == "832x480@93"  # 16:9 lands on 480x832
    assert assign_bucket(2160, 3840, 93, s).key == "832x480@93"  # 4K too
    assert 0.02 < crop_loss(1080, 1920, 480, 832) < 0.03
    s2 = DatasetSettings(bucket_strategy="resolution_frames", resolution="480x832", frame_interval=8)
    assert assign_bucket(360, 640, 93, s2).key == "640x352@89"
    with pytest.raises(BucketError, match="multiple of 16"):
        parse_resolution("480x830")
    with pytest.raises(BucketError, match="4k\\+1"):
        scan_dataset(SAMPLES, DatasetSettings(num_frames=92))


def test_4k_and_rotated_clips(tmp_path):
    write_clip(tmp_path / "uhd.mp4", n=3, h=2160, w=3840)
    (tmp_path / "uhd.txt").write_text("A 4K clip.")
    write_clip(tmp_path / "rot.mp4", n=20, h=48, w=96, rotate=90)
    (tmp_path / "rot.txt").write_text("A rotated phone clip.")
    info = probe(tmp_path / "rot.mp4")
    rep = scan_dataset(tmp_path, DatasetSettings(num_frames=1, resolution="128x224"))
    assert not rep.problems
    uhd = next(r for r in rep.records if "uhd" in r["file"])
    assert uhd["height"] < uhd["width"]
    if info.rotation % 180:  # the container kept the rotation: displayed portrait
        assert (info.width, info.height) == (48, 96)
        rot = next(r for r in rep.records if "rot" in r["file"])
        assert rot["height"] > rot["width"]
        assert load_sample_frames(rot).shape[1] > load_sample_frames(rot).shape[2]


def test_rotation_is_applied_to_decoded_frames():
    from longcat_nb.data.video import _rotate

    frame = np.zeros((48, 96, 3), np.uint8)
    frame[0, -1] = 255  # top-right marker
    turned = _rotate(frame, 90)  # display matrix says 90° counter-clockwise
    assert turned.shape == (96, 48, 3) and turned[0, 0, 0] == 255
    assert _rotate(frame, 180)[-1, 0, 0] == 255
