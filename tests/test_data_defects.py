"""Dataset scan defects of issue 26: duplicates, random crops, low frame rates, tiny clips, unreadable
files and folders, listing paths outside the dataset folder."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_dataset import write_clip

from longcat_nb.config import CacheSettings, DatasetSettings
from longcat_nb.data import scan_dataset
from longcat_nb.data.video import load_sample_frames

SMALL = DatasetSettings(num_frames=9, resolution="64x64")


def _names(items):
    return {Path(x["file"] if isinstance(x, dict) else x.file).name for x in items}


def _problem(rep, name):
    found = [p for p in rep.problems if Path(p.file).name == name]
    assert len(found) == 1, (name, rep.problems)
    return found[0]


# ---------------------------------------------------------------------------------------------
# 9. a duplicate pair keeps one copy
# ---------------------------------------------------------------------------------------------
def test_duplicate_keeps_the_copy_with_a_usable_caption(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_clip(tmp_path / "a" / "clip.mp4", n=20)
    (tmp_path / "a" / "clip.txt").write_text("   ")  # the first copy by path has an empty caption
    shutil.copy(tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4")
    (tmp_path / "b" / "clip.txt").write_text("A grey clip.")
    rep = scan_dataset(tmp_path, SMALL)
    assert [r["file"] for r in rep.records] == [str(tmp_path / "b" / "clip.mp4")]
    assert rep.records[0]["caption"] == "A grey clip."
    [dup] = [p for p in rep.problems if p.kind == "duplicate"]
    assert dup.file == str(tmp_path / "a" / "clip.mp4")
    assert str(tmp_path / "b" / "clip.mp4") in dup.value and "kept" in dup.fix
    assert not [p for p in rep.problems if p.kind == "empty caption"]  # the dropped copy's caption is moot


def test_duplicate_without_a_usable_caption_keeps_the_first_by_path(tmp_path):
    write_clip(tmp_path / "x.mp4", n=20)
    shutil.copy(tmp_path / "x.mp4", tmp_path / "y.mp4")  # neither has a caption
    shutil.copy(tmp_path / "x.mp4", tmp_path / "z.mp4")
    (tmp_path / "z.txt").write_text("")
    rep = scan_dataset(tmp_path, SMALL)
    assert not rep.records
    assert _problem(rep, "x.*").kind == "missing caption"  # the kept copy names its own problem
    for name in ("y.mp4", "z.mp4"):
        p = _problem(rep, name)
        assert p.kind == "duplicate" and str(tmp_path / "x.mp4") in p.value


# ---------------------------------------------------------------------------------------------
# 10. random crops: one per window (and variant), drawn from the seed, keyed in the cache
# ---------------------------------------------------------------------------------------------
def _wide_clip(path, n=60, h=32, w=96):
    """A horizontal ramp, so crops at different offsets hold different pixels."""
    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        ramp = np.broadcast_to(np.linspace(0, 255, w, dtype=np.float32)[None, :, None], (h, w, 3))
        for _ in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(ramp.astype(np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_random_crops_differ_per_window_and_repeat_with_the_seed(tmp_path):
    from longcat_nb.cache import latent_key

    _wide_clip(tmp_path / "wide.mp4")
    (tmp_path / "wide.txt").write_text("A grey ramp.")
    s = DatasetSettings(num_frames=5, resolution="64x64", bucket_grid=64, extraction="slide", stride=5, crop="random")
    plain, center = scan_dataset(tmp_path, s), scan_dataset(tmp_path, replace(s, crop="center"))
    assert len(plain.records) == len(center.records) == 6
    assert any(not np.array_equal(load_sample_frames(r), load_sample_frames(c))  # random is not center
               for r, c in zip(plain.records, center.records))
    first = scan_dataset(tmp_path, s, seed=7)
    again = scan_dataset(tmp_path, s, seed=7)
    other = scan_dataset(tmp_path, s, seed=8)
    assert len(first.records) == 6 and first.records[0]["bucket"] == "64x64@5"
    offsets = [tuple(r["crop_offset"]) for r in first.records]
    assert len(set(offsets)) == len(offsets)  # every window its own crop
    assert offsets == [tuple(r["crop_offset"]) for r in again.records]  # same seed: same crops
    assert offsets != [tuple(r["crop_offset"]) for r in other.records]
    a, b = first.records[:2]
    assert not np.array_equal(load_sample_frames(a), load_sample_frames(b))  # the pixels follow the crop
    assert np.array_equal(load_sample_frames(a), load_sample_frames(again.records[0]))
    # the latent of one crop is never reused for another crop of the same frames
    cs, ident = CacheSettings(), {"vae": "v"}
    same_frames = {**a, "frame_indices": b["frame_indices"], "window_start": b["window_start"]}
    assert latent_key(same_frames, ident, cs) != latent_key(b, ident, cs)
    assert all("crop_offset" not in r for r in center.records)  # center crops keep their cache keys


def test_crop_variants_give_several_crops_of_one_window(tmp_path):
    _wide_clip(tmp_path / "wide.mp4", n=20)
    (tmp_path / "wide.txt").write_text("A grey ramp.")
    s = DatasetSettings(num_frames=5, resolution="64x64", bucket_grid=64, crop="random")
    rep = scan_dataset(tmp_path, s, seed=3, crop_variants=3)
    assert [(r["window"], r["window_start"], r["crop_variant"]) for r in rep.records] == \
        [(0, 0, 0), (1, 0, 1), (2, 0, 2)]
    assert len({tuple(r["crop_offset"]) for r in rep.records}) == 3
    with pytest.raises(ValueError, match="crop_variants=2 needs crop='random'"):
        scan_dataset(tmp_path, DatasetSettings(num_frames=5, resolution="64x64"), crop_variants=2)


# ---------------------------------------------------------------------------------------------
# 11. a clip below target_fps keeps its real speed (frames repeated) and is reported
# ---------------------------------------------------------------------------------------------
def test_low_fps_clip_repeats_frames_and_is_reported(tmp_path):
    from longcat_nb.ui.dataset_view import summary_rows

    write_clip(tmp_path / "slow.mp4", n=20, fps=10)  # 2 s at 10 fps
    (tmp_path / "slow.txt").write_text("A grey clip at 10 fps.")
    rep = scan_dataset(tmp_path, DatasetSettings(num_frames=25, resolution="64x64", target_fps=15))
    [r] = rep.records
    assert r["num_frames"] == 25  # 2 s hold 30 frames at 15 fps, not 20
    idx = r["frame_indices"]
    assert len(set(idx)) < len(idx) and idx == sorted(idx)  # frames repeated, never reordered
    assert abs(idx[-1] / 10.0 - 24 / 15.0) < 0.1  # 25 frames at 15 fps span 1.6 s of the source
    p = _problem(rep, "slow.mp4")
    assert p.kind == "low frame rate" and "10 fps < target_fps=15" in p.value
    assert "target_fps=10" in p.fix and "minterpolate" in p.fix
    [row] = summary_rows(rep)
    assert "frames repeated" in str(row["fps"])


# ---------------------------------------------------------------------------------------------
# 12. a tiny clip is not upscaled without a word
# ---------------------------------------------------------------------------------------------
def test_tiny_clips_and_images_are_reported_with_their_size(tmp_path):
    write_clip(tmp_path / "tiny.mp4", n=20, h=12, w=12)
    (tmp_path / "tiny.txt").write_text("A tiny clip.")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    (tmp_path / "dot.txt").write_text("One red pixel.")
    write_clip(tmp_path / "fine.mp4", n=20, h=48, w=48)  # 1.3x: fine
    (tmp_path / "fine.txt").write_text("A grey clip.")
    rep = scan_dataset(tmp_path, SMALL)
    assert _names(rep.records) == {"fine.mp4"}
    tiny, dot = _problem(rep, "tiny.mp4"), _problem(rep, "dot.png")
    assert tiny.kind == dot.kind == "too small"
    assert "12x12" in tiny.value and "5.3x" in tiny.value and "64x64" in tiny.value
    assert "1x1" in dot.value and "64.0x" in dot.value
    assert "resolution" in tiny.fix


# ---------------------------------------------------------------------------------------------
# 13. unreadable files and unlistable folders are per-file problems
# ---------------------------------------------------------------------------------------------
_SCAN = """
import json, sys
from longcat_nb.config import DatasetSettings
from longcat_nb.data import scan_dataset
rep = scan_dataset(sys.argv[1], DatasetSettings(num_frames=9, resolution="64x64"))
print(json.dumps({"records": [r["file"] for r in rep.records], "problems": [vars(p) for p in rep.problems]}))
"""


def _drop_file_overrides():
    """Root reads a mode-000 file anyway: the child drops the two capabilities that bypass file modes
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so modes apply to it as they do to any other user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _scan_unprivileged(folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    pre = _drop_file_overrides if os.geteuid() == 0 else None
    try:
        out = subprocess.run([sys.executable, "-c", _SCAN, str(folder)], env=env, preexec_fn=pre,
                             capture_output=True, text=True, timeout=120)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot run a process that file modes apply to: {e}")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unreadable_file_and_unlistable_folder_are_problems(tmp_path):
    d = tmp_path
    for stem in ("good", "locked", "nocap"):
        write_clip(d / f"{stem}.mp4", n=20, h=32 + 8 * len(stem))
        (d / f"{stem}.txt").write_text(f"A {stem} clip.")
    (d / "hidden").mkdir()
    write_clip(d / "hidden" / "inner.mp4", n=20, h=64)
    (d / "hidden" / "inner.txt").write_text("Inside a folder nobody may list.")
    os.chmod(d / "locked.mp4", 0)
    os.chmod(d / "nocap.txt", 0)
    os.chmod(d / "hidden", 0)
    try:
        got = _scan_unprivileged(d)
    finally:
        for p in (d / "hidden", d / "locked.mp4", d / "nocap.txt"):
            os.chmod(p, 0o755)
    assert [Path(f).name for f in got["records"]] == ["good.mp4"]
    by = {Path(p["file"]).name: p for p in got["problems"]}
    assert by["locked.mp4"]["kind"] == "unreadable file" and "Permission denied" in by["locked.mp4"]["value"]
    assert "chmod" in by["locked.mp4"]["fix"]
    assert by["nocap.txt"]["kind"] == "unreadable file"
    assert by["hidden"]["kind"] == "unreadable folder" and "its clips are not scanned" in by["hidden"]["value"]
    assert "chmod" in by["hidden"]["fix"]


# ---------------------------------------------------------------------------------------------
# 14. listing paths stay inside the dataset folder unless the user opts in
# ---------------------------------------------------------------------------------------------
def test_listing_paths_outside_the_folder_are_refused(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_clip(d / "inside.mp4", n=20)
    write_clip(tmp_path / "outside.mp4", n=20, h=32)
    rows = [{"file": "inside.mp4", "caption": "Inside."},
            {"file": "../outside.mp4", "caption": "Outside, relative."},
            {"file": "/etc/shadow", "caption": "Absolute."},
            {"file": "inside.mp4", "caption": "Condition image outside.", "condition_image": "../../x.png"}]
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = scan_dataset(d, SMALL)
    assert [r["file"] for r in rep.records] == [str(d / "inside.mp4")]
    refused = [p for p in rep.problems if p.kind == "outside the dataset folder"]
    assert [p.value for p in refused] == ["../outside.mp4", "/etc/shadow", "../../x.png"]
    assert all(p.file.startswith(str(d / "metadata.jsonl") + ":") for p in refused)
    assert "allow_outside" in refused[0].fix and str(d) in refused[0].fix
    opted = scan_dataset(d, SMALL, allow_outside=True)
    assert str(tmp_path / "outside.mp4") in [r["file"] for r in opted.records]
