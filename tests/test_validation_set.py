"""Validation from held-out data: eval samples' captions become validation prompts, a conditioning image
(or, on request, the clip's first frame) the image-to-video input; never a training sample's."""
import json

import numpy as np
import pytest
from PIL import Image

from longcat_nb.config import TrainSettings
from longcat_nb.validation_set import eval_records, with_eval_prompts
from helpers import make_run


@pytest.fixture()
def run(tmp_path, tiny_ckpt):
    run = tmp_path / "run"
    make_run(run, tiny_ckpt)
    recs = [json.loads(l) for l in (run / "dataset.jsonl").read_text().splitlines()]
    for i, r in enumerate(recs):
        r["role"] = "eval" if i in (1, 2) else "train"
    (run / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run, recs


def test_eval_captions_become_prompts_after_the_given_ones(run):
    run, recs = run
    s = TrainSettings(validation_prompts=["mine"], validation_from_eval=5)
    out = with_eval_prompts(run, s)
    assert out.validation_prompts == ["mine", recs[1]["caption"], recs[2]["caption"]]
    assert out.validation_images == ["", recs[1].get("condition_image") or "", recs[2].get("condition_image") or ""]
    assert [r["file"] for r in eval_records(run)] == [recs[1]["file"], recs[2]["file"]]  # never a train sample
    assert with_eval_prompts(run, TrainSettings(validation_from_eval=1)).validation_prompts == [recs[1]["caption"]]
    assert with_eval_prompts(run, TrainSettings()) == TrainSettings()  # 0 = off


def test_first_frames_as_image_to_video_inputs(run):
    run, recs = run
    out = with_eval_prompts(run, TrainSettings(validation_from_eval=2, validation_eval_i2v=True))
    for rec, image in zip(recs[1:3], out.validation_images):
        if rec.get("condition_image"):
            assert image == rec["condition_image"]
            continue
        frame = np.asarray(Image.open(image))
        assert frame.shape == (rec["height"], rec["width"], 3)  # the clip's first frame as cached


def test_no_eval_sample_is_a_clear_error(tmp_path, tiny_ckpt):
    run = tmp_path / "run"
    make_run(run, tiny_ckpt)
    with pytest.raises(ValueError, match="no eval sample.*role"):
        with_eval_prompts(run, TrainSettings(validation_from_eval=2))


def test_the_fixture_has_one_eval_clip_with_and_one_without_a_conditioning_image(run):
    _, recs = run
    assert [bool(r.get("condition_image")) for r in recs[1:3]] in ([False, True], [True, False])
