"""Every setting is checked before config.json is written (issue 26, items 5, 6 and 15): an impossible value
is refused with the setting, the value, what is allowed and the fix, and the file on disk stays as it was."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from longcat_nb.config import ConfigError, load_config, resolve_parameters, save_config, update_section

# (section, setting, value, what the message must show besides the setting and the value)
BAD = [
    ("train", "steps", -1, "at least 1"),
    ("train", "steps", -5, "at least 1"),
    ("train", "steps", 0, "at least 1"),
    ("train", "rank", 0, "at least 1"),
    ("train", "alpha", 0, "above 0"),
    ("train", "lr", 0, "above 0"),
    ("train", "lr", -1e-4, "above 0"),
    ("train", "batch_size", 0, "at least 1"),
    ("train", "grad_accum", 0, "at least 1"),
    ("train", "checkpoint_every", -1, "at least 0"),
    ("train", "keep_checkpoints", -1, "at least 0"),
    ("train", "warmup_steps", -10, "at least 0"),
    ("train", "dropout", 1.0, "below 1"),
    ("train", "dropout", -0.1, "at least 0"),
    ("train", "caption_dropout", 1.5, "at most 1"),
    ("train", "max_grad_norm", -1, "at least 0"),
    ("train", "blocks_to_swap", -2, "at least 0"),
    ("train", "seed", -3, "at least 0"),
    ("train", "validate_every", -1, "at least 0"),
    ("train", "validation_steps", 0, "at least 1"),
    ("train", "validation_height", 100, "multiple of 16"),
    ("train", "validation_width", 0, "multiple of 16"),
    ("train", "validation_frames", 10, "4k+1"),
    ("train", "validation_guidance", 0.5, "at least 1"),
    ("train", "optimizer", "sgd", "adamw8bit"),
    ("train", "lr_schedule", "linear", "cosine"),
    ("train", "timestep_sampling", "normal", "logit_normal"),
    ("train", "base_precision", "int3", "fp8_rowwise"),
    ("train", "keep_attention", "maybe", "auto, on, off"),
    ("train", "compile", "fast", "auto, on, off"),
    ("train", "targets", [], "at least one"),
    ("dataset", "num_frames", 94, "4k+1"),
    ("dataset", "num_frames", 0, "4k+1"),
    ("dataset", "min_frames", 6, "4k+1"),
    ("dataset", "target_fps", 0, "above 0"),
    ("dataset", "windows", 0, "at least 1"),
    ("dataset", "stride", -4, "at least 0"),
    ("dataset", "frame_interval", 0, "at least 1"),
    ("dataset", "max_caption_tokens", 0, "at least 1"),
    ("dataset", "resolution", "480by832", "HEIGHTxWIDTH"),
    ("dataset", "resolution", "481x832", "multiple of 16"),
    ("dataset", "bucket_grid", 24, "multiple of 16"),
    ("dataset", "crop", "left", "center, random, none"),
    ("dataset", "extraction", "tail", "head, uniform, slide"),
    ("dataset", "short_clips", "pad", "keep, drop"),
    ("dataset", "bucket_strategy", "square", "aspect_ratio"),
    ("cache", "latent_dtype", "int8", "bfloat16"),
    ("cache", "text_encoder", "clip", "umt5"),
    ("cache", "posterior", "max", "sample, mode"),
    ("model", "attention", "flash4", "auto, sdpa, xformers, bsa, quant8"),
    ("model", "device", "gpu", "cuda:N"),
    ("model", "dit_dtype", "float64", "bfloat16"),
    ("model", "text_encoder_dtype", "int8", "bfloat16"),
    ("model", "vae_dtype", "half", "bfloat16"),
    ("sample", "mode", "v2v", "t2v, i2v, continuation"),
    ("sample", "offload", "disk", "none, model"),
    ("sample", "precision", "int3", "fp8_rowwise"),
    ("sample", "compile", "yes please", "auto, on, off"),
    ("sample", "resolution", "1080p", "480p"),
    ("sample", "height", 100, "multiple of 16"),
    ("sample", "num_frames", 10, "4k+1"),
    ("sample", "num_cond_frames", 12, "4k+1"),
    ("sample", "steps", -1, "at least 0"),
    ("sample", "guidance", 0.5, "at least 1"),
    ("sample", "fps", 0, "at least 1"),
    ("sample", "seed", -1, "at least 0"),
    ("sample", "blocks_to_swap", -1, "at least 0"),
    ("sample", "loras", [{"scale": 1.0}], "path"),
]


@pytest.fixture()
def saved_run(tmp_path):
    """A run folder with a config.json that has every section written once (as the notebooks leave it)."""
    update_section(tmp_path, "model", device="cpu")
    update_section(tmp_path, "train", steps=7, rank=4)
    return tmp_path, (tmp_path / "config.json").read_bytes()


@pytest.mark.parametrize("section,key,value,allowed", BAD, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD])
def test_impossible_value_is_refused_and_config_json_is_unchanged(saved_run, section, key, value, allowed):
    run, before = saved_run
    with pytest.raises(ConfigError) as err:
        update_section(run, section, **{key: value})
    msg = str(err.value)
    assert f"{section}.{key}" in msg and repr(value) in msg and allowed in msg, msg
    assert "config.json" in msg and "was not changed" in msg, msg
    assert (run / "config.json").read_bytes() == before
    # the notebooks' parameter path (the form cell) refuses it too, before anything is written
    with pytest.raises(ConfigError, match=f"{key}.*{re.escape(allowed)}"):
        resolve_parameters(run, section, **{key: value})
    assert (run / "config.json").read_bytes() == before


def test_cross_setting_rules(saved_run):
    run, before = saved_run
    with pytest.raises(ConfigError, match=r"validation_images.*2.*1 prompt"):
        update_section(run, "train", validation_prompts=["a"], validation_images=["", "x.png"])
    assert (run / "config.json").read_bytes() == before


@pytest.mark.parametrize("section,key,value", [("train", "steps", "inf"), ("train", "steps", float("nan")),
                                               ("train", "lr", "nan"), ("train", "alpha", float("inf"))])
def test_not_a_finite_number_is_refused(saved_run, section, key, value):
    run, before = saved_run
    with pytest.raises(ConfigError, match=f"{section}.{key}: expected a (whole|finite) number"):
        update_section(run, section, **{key: value})
    assert (run / "config.json").read_bytes() == before


def test_save_config_refuses_a_bad_value_and_keeps_the_file(saved_run):
    run, before = saved_run
    cfg = load_config(run)
    cfg.train.rank = 0
    with pytest.raises(ConfigError, match=r"train.rank=0.*at least 1"):
        save_config(run, cfg)
    assert (run / "config.json").read_bytes() == before


def test_a_hand_edited_bad_value_is_refused_on_load_and_a_parameter_can_fix_it(saved_run):
    run, _ = saved_run
    data = json.loads((run / "config.json").read_text())
    data["train"]["steps"] = -5
    (run / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config.json: train.steps=-5.*at least 1"):
        load_config(run)
    assert resolve_parameters(run, "train", steps=20) == {"steps": 20}  # the value that replaces it is fine
    assert update_section(run, "train", steps=20).train.steps == 20


def test_train_command_with_bad_steps_fails_before_writing_anything(saved_run):
    run, _ = saved_run
    data = json.loads((run / "config.json").read_text())
    data["train"]["steps"] = -5
    text = json.dumps(data)
    (run / "config.json").write_text(text)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "longcat_nb", "train", "--run-dir", str(run)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "train.steps=-5" in p.stderr, p.stderr[-2000:]
    assert sorted(x.name for x in run.iterdir()) == ["config.json"]
    assert (run / "config.json").read_text() == text


def test_allowed_values_and_the_new_choice_settings(tmp_path):
    cfg = load_config(tmp_path)
    assert (cfg.model.attention, cfg.train.compile, cfg.sample.compile) == ("auto", "auto", "auto")
    cfg = update_section(tmp_path, "model", attention="quant8", device="cuda:1", dit_dtype="bf16")
    assert (cfg.model.attention, cfg.model.device, cfg.model.dit_dtype) == ("quant8", "cuda:1", "bf16")
    for given, stored in ((True, "on"), (False, "off"), ("true", "on"), ("off", "off"), ("auto", "auto")):
        assert update_section(tmp_path, "train", compile=given).train.compile == stored
        assert resolve_parameters(tmp_path, "sample", compile=given) == {"compile": stored}
    # a config.json from before compile took auto | on | off
    data = json.loads((tmp_path / "config.json").read_text())
    data["train"]["compile"], data["sample"]["compile"] = True, False
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = load_config(tmp_path)
    assert (cfg.train.compile, cfg.sample.compile) == ("on", "off")
    cfg = update_section(tmp_path, "dataset", num_frames=9, min_frames=17, resolution="64x64", bucket_grid=64)
    assert cfg.dataset.min_frames == 17  # above num_frames is harmless: short clips are capped at num_frames
    update_section(tmp_path, "sample", height=0, width=96, num_frames=0, steps=0, guidance=0.0,
                   loras=[{"path": "a.safetensors", "scale": 0.5}])


def test_one_table_of_choices_matches_the_code_that_uses_them():
    from longcat_nb.config import field_choices
    from longcat_nb.data.buckets import SHORT_CLIPS
    from longcat_nb.memory import PRECISIONS
    from longcat_nb.models.attention import BACKENDS
    from longcat_nb.sampling import MODES, OFFLOAD

    assert field_choices("model")["attention"] == BACKENDS  # auto resolves per grid in the model (attention.resolve_auto)
    assert set(field_choices("train")["base_precision"]) == set(PRECISIONS)
    assert set(field_choices("sample")["precision"]) == set(PRECISIONS)
    assert field_choices("sample")["mode"] == MODES and field_choices("sample")["offload"] == OFFLOAD
    assert field_choices("dataset")["short_clips"] == SHORT_CLIPS
    assert field_choices("train")["compile"] == field_choices("sample")["compile"] == ("auto", "on", "off")


def test_shared_defaults_are_defined_once():
    """The LoRA targets, the precisions and the sampling choices live in config.py (torch-free); the
    modules that use them hold that very object, not a copy that could drift."""
    from longcat_nb import config, flow, lora, memory, planner, train
    from longcat_nb import sampling as sample

    assert lora.DEFAULT_TARGETS is planner.PlanSettings().targets is config.DEFAULT_TARGETS
    assert config.TrainSettings().targets == list(config.DEFAULT_TARGETS)
    assert memory.QUANTIZED is planner.QUANTIZED is config.QUANTIZED
    assert memory.PRECISIONS is config.PRECISIONS and set(config.QUANTIZED) < set(config.PRECISIONS)
    assert set(planner.WEIGHT_BYTES) == set(config.PRECISIONS) - {"auto"}  # the planner prices every one
    assert (sample.MODES, sample.OFFLOAD, sample.BASE_FPS) == (config.MODES, config.OFFLOAD, config.BASE_FPS)
    assert sample.MODES is config.MODES and sample.OFFLOAD is config.OFFLOAD
    assert train.train_sigmas is flow.train_sigmas and sample.shift_sigmas is flow.shift_sigmas
    assert not hasattr(train, "SHIFT") and sample.SHIFT is flow.SHIFT


def test_config_and_planner_import_without_torch(repo_root):
    """Why the shared choices live in config.py: settings and plans are read where torch is absent."""
    code = "import sys, longcat_nb.config, longcat_nb.planner; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)


# ---------------------------------------------------------------------------------------------
# the checkpoint folder (item 15)
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def broken_ckpt(tmp_path, tiny_ckpt):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    shutil.rmtree(ck / "dit")
    shutil.rmtree(ck / "tokenizer")
    (ck / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    return ck


def test_checkpoint_check_lists_every_missing_part_and_the_download(broken_ckpt):
    from longcat_nb.model_files import CheckpointError, check_checkpoint, load_components, load_scheduler

    for call in (lambda: check_checkpoint(broken_ckpt), lambda: load_components(broken_ckpt, device="cpu")):
        with pytest.raises(CheckpointError) as err:
            call()
        msg = str(err.value)
        for part in ("dit/", "tokenizer/", "vae/diffusion_pytorch_model.safetensors"):
            assert part in msg, msg
        assert "text_encoder" not in msg and "scheduler" not in msg, msg
        assert f"hf download meituan-longcat/LongCat-Video --local-dir {broken_ckpt}" in msg, msg
        assert "--include 'dit/*'" in msg and "huggingface-cli" not in msg, msg
    load_scheduler(broken_ckpt)  # the parts that are there still load


def test_a_shard_named_in_the_index_but_absent_is_listed(tmp_path, tiny_ckpt):
    from longcat_nb.model_files import CheckpointError, check_checkpoint, load_dit

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    shard = sorted((ck / "dit").glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"dit/{shard.name}"):
        check_checkpoint(ck)
    with pytest.raises(CheckpointError, match=f"dit/{shard.name}"):
        load_dit(ck)


def test_missing_folder_names_hf_download(tmp_path):
    from longcat_nb.model_files import CheckpointError, resolve_checkpoint

    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(tmp_path / "nowhere")
    assert "hf download meituan-longcat/LongCat-Video" in str(err.value)
    assert "huggingface-cli" not in str(err.value)


def test_no_huggingface_cli_left_in_the_kit(repo_root):
    hits = [str(p.relative_to(repo_root)) for folder in ("longcat_nb", "notebooks")
            for p in (repo_root / folder).rglob("*") if p.suffix in (".py", ".ipynb")
            and "huggingface-cli" in p.read_text(encoding="utf-8")]
    assert not hits


def test_00_setup_refuses_a_bad_choice_and_an_incomplete_checkpoint(tmp_path, tiny_ckpt, broken_ckpt):
    """Headless 00: attention=flash4 and a checkpoint without dit/ stop with the reason; config.json as it was."""
    from papermill.exceptions import PapermillExecutionError

    from longcat_nb.runner import run_notebooks

    run = tmp_path / "run"
    update_section(run, "model", checkpoint=str(tiny_ckpt), device="cpu")
    before = (run / "config.json").read_bytes()
    with pytest.raises(PapermillExecutionError, match=r"model.attention='flash4'.*sdpa"):
        run_notebooks(["00_setup"], run, {"attention": "flash4"}, log=lambda *a: None)
    assert (run / "config.json").read_bytes() == before
    with pytest.raises(PapermillExecutionError, match=r"dit/.*hf download"):
        run_notebooks(["00_setup"], run, {"checkpoint": str(broken_ckpt)}, log=lambda *a: None)
    assert (run / "config.json").read_bytes() == before


def test_training_on_a_checkpoint_without_dit_names_what_is_missing(tmp_path, tiny_ckpt):
    """03 on a cache made with a complete folder whose dit/ is gone since: the part and the download, not a
    bare FileNotFoundError."""
    from helpers import one_clip_run

    from longcat_nb.model_files import CheckpointError
    from longcat_nb.train import train

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    run = tmp_path / "run"
    one_clip_run(run, ck)
    update_section(run, "model", attention="sdpa")
    update_section(run, "train", steps=2, rank=4, checkpoint_every=0)
    shutil.rmtree(ck / "dit")
    with pytest.raises(CheckpointError, match=r"missing dit/\..*hf download meituan-longcat/LongCat-Video"):
        train(run, log=lambda *a: None)
    assert not (run / "checkpoints").exists() and not (run / "lora").exists()
