"""Validation with the checkpoint's distill LoRA (train.validation_distilled): 16 steps without guidance,
the distill LoRA stacked under the LoRA being trained, refused up front where the checkpoint lacks it."""
import json

import pytest

import longcat_nb.train as T
from longcat_nb.model_files import load_components
from longcat_nb.config import update_section
from longcat_nb.lora import add_lora
from helpers import one_clip_run
from test_sample import CFG_STEP_TARGETS, official_lora


@pytest.fixture(scope="module")
def ckpt_with_distill(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_distill")
    for part in ("dit", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / part).symlink_to(tiny_ckpt / part)
    (root / "lora").mkdir()
    dit = load_components(tiny_ckpt, device="cpu").dit
    blocks = [f"blocks.{i}.{t}" for i in range(len(dit.blocks)) for t in CFG_STEP_TARGETS]
    official_lora(dit, root / "lora" / "cfg_step_lora.safetensors", blocks, seed=1)
    return root


def test_distilled_validation_stacks_the_distill_lora_under_the_trained_one(ckpt_with_distill, tmp_path):
    run = tmp_path / "run"
    one_clip_run(run, ckpt_with_distill)
    update_section(run, "train", validation_prompts=["a green square"], validation_distilled=True,
                   validation_height=64, validation_width=64, validation_frames=9)
    v = T.Validator(run, T.load_config(run))
    model = load_components(ckpt_with_distill, device="cpu").dit.float()
    add_lora(model, rank=4, alpha=4, targets=["attn.qkv"])  # the LoRA being trained
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    v(3, model)
    meta = json.loads((run / "samples" / "validation" / "step000003_0.json").read_text())
    assert meta["distilled"] is True and meta["steps"] == 16 and meta["guidance"] == 1.0
    assert [p for p, _ in meta["loras"]] == [str(ckpt_with_distill / "lora" / "cfg_step_lora.safetensors")]
    # the distill LoRA is gone again; the trained LoRA is still there, trainable, and active
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    assert not any("cfg_step" in n for n, _ in model.named_parameters())


def test_distilled_validation_without_the_distill_lora_is_refused_before_training(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    one_clip_run(run, tiny_ckpt)
    update_section(run, "train", validation_prompts=["a green square"], validation_distilled=True)
    with pytest.raises(FileNotFoundError, match="cfg_step_lora.safetensors"):
        T.Validator(run, T.load_config(run))
