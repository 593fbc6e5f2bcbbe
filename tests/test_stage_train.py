"""stages.train, what 03_train_lora's cells call: the plan of the run's own settings, and training that
returns what train() returns."""
import json
from dataclasses import asdict

import pytest

import longcat_nb.train as T
from longcat_nb.config import TrainSettings, load_config, update_section
from longcat_nb.lora import PRESETS
from longcat_nb.planner import PlanSettings, plan, training_plan_settings
from longcat_nb.stages import train as stage
from helpers import fresh_copy, one_clip_run

ATTN_FFN = (*PRESETS["attn"], *PRESETS["ffn"])


def test_plan_is_the_planners_for_the_runs_settings_including_targets(tmp_path):
    run = tmp_path / "run"
    update_section(run, "dataset", resolution="240x416", num_frames=45)
    settings = dict(asdict(load_config(run).train), rank=16, base_precision="int8", batch_size=2,
                    optimizer="adamw8bit", targets=["attn", "ffn"], compile="off")
    out = stage.plan(run, settings)
    want = plan(PlanSettings(height=240, width=416, num_frames=45, rank=16, precision="int8", batch_size=2,
                             optimizer="adamw8bit", targets=ATTN_FFN, compile=False))
    assert out["peak_gib"] == round(want.peak_gib, 1) and out["parts_gib"] == want.parts
    assert tuple(out["settings"]["targets"]) == ATTN_FFN
    # the ffn targets count: they nearly double the LoRA and its optimizer states
    attn_only = plan(PlanSettings(rank=16, optimizer="adamw8bit", targets=PRESETS["attn"]))
    assert out["parts_gib"]["lora_and_optimizer"] > 1.7 * attn_only.parts["lora_and_optimizer"]
    assert out["checkpointing"] == "full" and out["fits"] is None  # no GPU here: no verdict
    assert out["summary"] == (f"full-size model at 240x416x45: predicted peak {out['peak_gib']} GiB GPU, "
                              f"{out['host_ram_gib']} GiB host RAM; checkpointing: full")
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["targets"] == ["attn", "ffn"] and saved["rank"] == 16  # written once checked
    assert stage.plan(run)["peak_gib"] == out["peak_gib"]  # no settings: the saved ones


def test_plan_settings_follow_the_train_section():
    s = TrainSettings(targets=["attn", "modulation", "final"], base_precision="auto", gradient_checkpointing=False,
                      activation_offload=True, blocks_to_swap=12)
    p = training_plan_settings(s, compile=True, selective=True)
    assert p.targets == tuple(PRESETS["attn"]) + ("adaLN_modulation.1",)  # final_layer: not a block linear
    assert (p.precision, p.gradient_checkpointing, p.activation_offload, p.blocks_to_swap, p.compile, p.selective) \
        == ("bf16", False, True, 12, True, True)
    assert (p.height, p.width, p.num_frames) == (480, 832, 93)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_ckpt):
    base = tmp_path_factory.mktemp("stage_train")
    one_clip_run(base / "src", tiny_ckpt)
    return base / "src"


def test_one_gpu_training_returns_what_train_returns(cached, tmp_path):
    runs = [fresh_copy(cached, tmp_path / name) for name in ("train", "stage")]
    for run in runs:
        update_section(run, "train", steps=3, rank=4, alpha=4, checkpoint_every=2, validate_every=0, seed=1)
    want = T.train(runs[0], log=lambda *a: None)
    lines = []
    got = stage.train_lora(runs[1], gpus=1, log=lines.append)
    assert got.steps == want.steps == 3 and got.losses == pytest.approx(want.losses, rel=1e-6)
    assert len(got.losses) == 3 and got.exports == want.exports
    assert got.lora_path == runs[1] / "lora" / want.lora_path.name
    assert got.checkpoint == runs[1] / "checkpoints" / want.checkpoint.name
    mean5 = sum(got.losses) / 3
    assert lines[-1] == f"3 steps on 1 process(es); loss {got.losses[0]:.4f} -> {mean5:.4f} (mean of last 5)"

    written = stage.export(runs[1], got, ["peft", "comfy"])
    assert written["ComfyUI layout"] == str(got.lora_path.with_name(got.lora_path.stem + "-comfy.safetensors"))
    assert "official layout" not in written and written["checkpoint"] == str(got.checkpoint)
    with pytest.raises(ValueError, match=r"\['onnx'\] unknown; choose from peft, official, comfy"):
        stage.export(runs[1], got, ["onnx"])
