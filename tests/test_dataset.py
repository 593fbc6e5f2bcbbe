"""Dataset scan: every problem kind is named with its file and fix; windows, buckets; folder untouched."""
import hashlib
from dataclasses import replace
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
    from longcat_nb.model_files import load_tokenizer

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
    from longcat_nb.model_files import load_tokenizer

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


# ---------------------------------------------------------------------------------------------
# short clips: kept at their own 4k+1 length by default; an empty scan is refused with its cause
# ---------------------------------------------------------------------------------------------
SAMPLE_FRAMES = {"green_square_spin": 45, "rain_stripes": 57, "red_ball_bounce": 45, "sunset_gradient": 37}


@pytest.mark.parametrize("strategy", ["aspect_ratio", "resolution_frames"])
def test_default_settings_keep_every_sample_clip_at_its_own_length(strategy):
    from longcat_nb.ui.dataset_view import summary_rows, summary_title

    s = DatasetSettings(bucket_strategy=strategy)
    assert (s.num_frames, s.short_clips, s.min_frames) == (93, "keep", 17)
    rep = scan_dataset(SAMPLES, s)  # 2.5-4 s clips at 15 fps: all shorter than 93 frames (6.2 s)
    assert not rep.problems and len(rep.records) == 4
    got = {Path(r["file"]).stem: r for r in rep.records}
    assert {k: r["num_frames"] for k, r in got.items()} == SAMPLE_FRAMES  # the longest 4k+1 each holds
    for r in rep.records:
        assert r["bucket"].endswith(f"@{r['num_frames']}") and (r["num_frames"] - 1) % 4 == 0
        assert r["frame_indices"] == resample_indices(r["num_frames"], 30.0, 15.0)  # every 2nd source frame
        assert r["duration_s"] == round(r["num_frames"] / 15.0, 3)
    assert len(rep.shortened) == 4 and len(rep.buckets()) == 4  # one bucket per (size, frame count)
    assert "4 clips shorter than num_frames=93" in summary_title(rep)
    rows = {Path(r["file"]).stem: r for r in summary_rows(rep)}
    assert rows["sunset_gradient"]["trained frames"] == "37 (shorter than 93)"
    sunset = got["sunset_gradient"]
    assert load_sample_frames(sunset).shape == (37, sunset["height"], sunset["width"], 3)


def test_drop_keeps_the_old_behaviour_with_a_fix_that_names_keep():
    rep = scan_dataset(SAMPLES, DatasetSettings(short_clips="drop"))
    assert not rep.records and [p.kind for p in rep.problems] == ["too short"] * 4
    sunset = next(p for p in rep.problems if "sunset" in p.file)
    assert sunset.frames == 37 and "< num_frames=93 (6.20 s)" in sunset.value
    assert "short_clips='keep'" in sunset.fix and "num_frames (e.g. 37)" in sunset.fix


def test_clip_below_min_frames_is_too_short_and_long_clips_are_untouched(tmp_path):
    write_clip(tmp_path / "blink.mp4", n=20)  # 10 frames at 15 fps: under min_frames=17
    write_clip(tmp_path / "short.mp4", n=40)  # 20 frames: kept at 17
    write_clip(tmp_path / "long.mp4", n=80)  # 40 frames: 2 uniform windows of 25
    for stem in ("blink", "short", "long"):
        (tmp_path / f"{stem}.txt").write_text(f"A {stem} grey clip.")
    s = DatasetSettings(num_frames=25, resolution="64x64", extraction="uniform", windows=2)
    rep = scan_dataset(tmp_path, s)
    [p] = rep.problems
    assert (Path(p.file).name, p.kind, p.frames) == ("blink.mp4", "too short", 10)
    assert "< min_frames=17 (1.13 s)" in p.value and "lower min_frames (e.g. 9)" in p.fix
    by = {}
    for r in rep.records:
        by.setdefault(Path(r["file"]).stem, []).append(r)
    assert [r["num_frames"] for r in by["short"]] == [17]  # one window: no near-copies of a short clip
    assert [(r["num_frames"], r["window_start"]) for r in by["long"]] == [(25, 0), (25, 15)]
    assert [Path(f["file"]).stem for f in rep.shortened] == ["short"]
    assert {Path(r["file"]).stem for r in scan_dataset(tmp_path, replace(s, min_frames=9)).records} == \
        {"blink", "short", "long"}
    with pytest.raises(BucketError, match="min_frames=16: the VAE needs 4k\\+1 frames; use 13 or 17"):
        scan_dataset(tmp_path, replace(s, min_frames=16))
    with pytest.raises(BucketError, match="short_clips='sometimes': use keep"):
        scan_dataset(tmp_path, replace(s, short_clips="sometimes"))


def test_resolution_frames_windows_have_the_bucket_frame_count(tmp_path):
    """frame_interval=8 rounds 13 frames down to a bucket of 9: the window must be 9 frames too, or
    one bucket would hold latents of two lengths and the trainer could not stack them."""
    write_clip(tmp_path / "a.mp4", n=60)
    (tmp_path / "a.txt").write_text("A grey clip.")
    rep = scan_dataset(tmp_path, DatasetSettings(num_frames=13, resolution="64x64", frame_interval=8,
                                                 bucket_strategy="resolution_frames"))
    [r] = rep.records
    assert r["bucket"].endswith("@9") and r["num_frames"] == 9 and len(r["frame_indices"]) == 9
    assert not rep.shortened  # the clip is long enough: the bucket rounding is not a short clip


def test_empty_scan_is_refused_with_the_cause_and_an_earlier_dataset_is_kept(tmp_path):
    from longcat_nb.data import EmptyDatasetError, check_samples

    run = tmp_path / "run"
    good = scan_dataset(SAMPLES, DatasetSettings(num_frames=9, resolution="64x64"))
    write_dataset_jsonl(run, good)
    before = (run / "dataset.jsonl").read_bytes()
    empty = scan_dataset(SAMPLES, DatasetSettings(min_frames=61))  # every sample clip holds 37..60 frames
    assert not empty.records
    with pytest.raises(EmptyDatasetError) as err:
        write_dataset_jsonl(run, empty)
    msg = str(err.value)
    assert f"no training samples in {SAMPLES}: 4 file(s) found, none usable" in msg
    assert "too short (4 files), shortest " in msg and "sunset_gradient.mp4: 37 frames at 15 fps (2.50 s)" in msg
    assert "lower min_frames (e.g. 37)" in msg
    assert f"{run / 'dataset.jsonl'} was not overwritten (it keeps its 4 samples from an earlier scan)" in msg
    assert (run / "dataset.jsonl").read_bytes() == before  # not replaced by an empty file
    problems = json.loads((run / "dataset_problems.json").read_text())
    assert [p["kind"] for p in problems] == ["too short"] * 4  # the reasons can be read
    with pytest.raises(EmptyDatasetError, match="was not written"):
        check_samples(tmp_path / "fresh", empty)
    assert not (tmp_path / "fresh" / "dataset.jsonl").exists()
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EmptyDatasetError, match="0 file\\(s\\) found; put clips .* set dataset_dir"):
        check_samples(tmp_path / "fresh", scan_dataset(tmp_path / "nothing", DatasetSettings()))
    check_samples(tmp_path / "fresh", good)  # samples: nothing raised, nothing written
    assert not (tmp_path / "fresh" / "dataset.jsonl").exists()


def test_01_dataset_notebook_stops_at_an_unusable_folder(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    from longcat_nb.runner import run_notebooks

    data = tmp_path / "clips"
    data.mkdir()
    write_clip(data / "blink.mp4", n=12)  # 6 frames at 15 fps
    (data / "blink.txt").write_text("A blink.")
    run = tmp_path / "run"
    with pytest.raises(PapermillExecutionError) as err:
        run_notebooks(["01_dataset"], run, dict(dataset_dir=str(data), resolution="64x64"), log=lambda *a: None)
    assert err.value.ename == "EmptyDatasetError" and "blink.mp4: 6 frames at 15 fps" in err.value.evalue
    assert not (run / "dataset.jsonl").exists() and (run / "dataset_problems.json").exists()
    text = (run / "executed" / "01_dataset.ipynb").read_text()
    assert "Problems (nothing in the dataset folder was changed)" in text  # shown before the error
