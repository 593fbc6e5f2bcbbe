"""Per-bucket batch sizes (train.batch_tokens): short or small buckets take more clips per batch, every
sample is still drawn once an epoch, and the planner sizes for the largest batch."""
import pytest

import longcat_nb.train as T
from longcat_nb.config import TrainSettings, update_section
from longcat_nb.planner import PlanSettings, plan, training_plan_settings
from longcat_nb.train_data import bucket_batch_sizes, bucket_tokens
from helpers import fresh_copy, one_clip_run

LONG, SHORT, STILL = "480x832@93|cond0", "480x832@29|cond0", "480x832@1|cond0"


def test_tokens_and_sizes_per_bucket():
    assert bucket_tokens(LONG) == 24 * 30 * 52 == 37_440
    assert bucket_tokens(SHORT) == 8 * 30 * 52 and bucket_tokens(STILL) == 30 * 52
    groups = {LONG: [0], SHORT: [1], STILL: [2]}
    assert bucket_batch_sizes(groups, 1) == {LONG: 1, SHORT: 1, STILL: 1}
    assert bucket_batch_sizes(groups, 1, 37_440) == {LONG: 1, SHORT: 3, STILL: 24}
    assert bucket_batch_sizes(groups, 2, 37_440) == {LONG: 2, SHORT: 3, STILL: 24}  # never below batch_size


def test_an_epoch_draws_every_sample_once_in_batches_of_each_buckets_size():
    groups = {LONG: list(range(0, 5)), SHORT: list(range(5, 12)), STILL: list(range(12, 62))}
    sizes = bucket_batch_sizes(groups, 1, 37_440)
    batches = T.epoch_batches(groups, sizes, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(62))
    for b in batches:
        key = next(k for k, idx in groups.items() if b[0] in idx)
        assert all(i in groups[key] for i in b) and len(b) <= sizes[key]
    assert max(len(b) for b in batches) == 24 and T.epoch_batches(groups, sizes, 3, 0) == batches
    stream = T.MicroBatches(groups, sizes, seed=3)
    assert stream.at({"epoch": 0, "batch": 0})[1] == batches[0]


def test_the_planner_sizes_for_the_largest_batch():
    base = plan(PlanSettings())
    two = plan(PlanSettings(batch_tokens=2 * 37_440))
    assert two.parts["saved_block_inputs"] == pytest.approx(2 * base.parts["saved_block_inputs"], rel=1e-3)
    assert training_plan_settings(TrainSettings(batch_tokens=50_000), compile=False).batch_tokens == 50_000


def test_training_runs_with_per_bucket_batches(tmp_path, tiny_ckpt):
    src = tmp_path / "src"
    one_clip_run(src, tiny_ckpt)
    run = fresh_copy(src, tmp_path / "run")
    update_section(run, "train", steps=2, rank=4, alpha=4, checkpoint_every=0, batch_tokens=10_000, targets=["attn"])
    res = T.train(run, log=lambda *a: None)
    assert len(res.losses) == 2
