"""train() end to end on a CUDA GPU with the settings the speed work added: compiled blocks, selective
checkpointing, the fp8_rowwise base, BSA, 8-bit attention. The tiny model, the data_samples clip; skipped without a GPU."""
import json
import math

import pytest
import torch

import longcat_nb.train as T
from longcat_nb.config import update_section
from helpers import fresh_copy, one_clip_run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_ckpt):
    run = tmp_path_factory.mktemp("gpu_train") / "src"
    one_clip_run(run, tiny_ckpt)
    return run


def _run(src, dst, **train):
    fresh_copy(src, dst)
    update_section(dst, "model", device="cuda", attention=train.pop("attention", "sdpa"))
    update_section(dst, "train", **{**dict(steps=6, rank=8, alpha=8, lr=1e-3, checkpoint_every=3, seed=0,
                                           caption_dropout=0.0, validate_every=0), **train})
    return dst


@pytest.mark.parametrize("precision", ["bf16", "fp8_rowwise"])
@pytest.mark.parametrize("attention", ["sdpa", "bsa", "quant8"])
def test_compiled_training_matches_eager_and_resumes(cached, tmp_path, precision, attention):
    if (precision == "fp8_rowwise" or attention == "quant8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls and 8-bit attention need compute capability 8.9+")
    eager = T.train(_run(cached, tmp_path / "eager", base_precision=precision, attention=attention,
                         compile=False), log=lambda *a: None).losses
    run = _run(cached, tmp_path / "compiled", base_precision=precision, attention=attention, compile=True,
               keep_attention="on")
    T.train(run, max_steps=3, log=lambda *a: None)
    resumed = T.train(run, log=lambda *a: None).losses  # a fresh process-level model: compile again
    assert len(eager) == len(resumed) == 6 and all(math.isfinite(x) for x in resumed)
    # the same step on the same data: compiled kernels round differently, the trajectory stays close
    for a, b in zip(eager, resumed):
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3, (eager, resumed)
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["step-0000003", "step-0000006"]
    meta = json.loads((run / "config.json").read_text())["train"]
    assert meta["compile"] == "on" and meta["base_precision"] == precision  # True is stored as "on"


def test_int8_base_with_block_swap_trains_as_without(cached, tmp_path):
    """The small cards' setting: an int8 base (quantized block by block as it loads onto the GPU) with
    swapped blocks and offloaded activations, compiled, trains the same steps as the int8 base kept whole."""
    pytest.importorskip("optimum.quanto")
    kw = dict(base_precision="int8", compile="on", activation_offload=True)
    whole = T.train(_run(cached, tmp_path / "whole", **kw), log=lambda *a: None).losses
    swapped = T.train(_run(cached, tmp_path / "swapped", blocks_to_swap=1, **kw), log=lambda *a: None).losses
    assert len(swapped) == 6 and all(math.isfinite(x) for x in swapped)
    for a, b in zip(whole, swapped):
        assert abs(a - b) <= 1e-3 * abs(a) + 1e-5, (whole, swapped)


@pytest.mark.parametrize("attention,precision", [("sdpa", "auto"), ("quant8", "fp8_rowwise")])
def test_compiled_sampling_matches_eager(tiny_ckpt, attention, precision):
    from longcat_nb.config import ModelSettings
    from longcat_nb.models.quant_attention import available
    from longcat_nb.sampling import SampleRequest, generate, load_sampling_components

    if (attention == "quant8" or precision == "fp8_rowwise") and not available("cuda"):
        pytest.skip("8-bit attention and fp8 matmuls need compute capability 8.9+")
    model = ModelSettings(checkpoint=str(tiny_ckpt), device="cuda", attention=attention)
    req = SampleRequest(prompt="a red ball", height=64, width=64, num_frames=9, steps=4, guidance=4.0, seed=1)
    latents = {}
    for compile in (False, True):
        comps = load_sampling_components(model, precision=precision, compile=compile)
        assert comps.memory["compile"] is compile and comps.dit.attention_backend == attention
        latents[compile] = generate(comps, req, progress=False).latents.float()
    rel = float((latents[True] - latents[False]).norm() / latents[False].norm())
    assert torch.isfinite(latents[True]).all() and rel < 0.02, rel
