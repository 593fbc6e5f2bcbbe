"""Loss masks on the tiny model: a same-stem mask (white = learn) is found at scan and is no sample
itself, it is cached with its sample on the latent grid, the masked-out region gives no gradient
through the real training path, and samples without a mask train as before."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import longcat_nb.train as T
from longcat_nb import lora as lora_lib
from longcat_nb.cache import CachedDataset, build_cache, latent_key
from longcat_nb.model_files import load_dit
from longcat_nb.config import CacheSettings, update_section
from longcat_nb.data.masks import to_latent_grid
from longcat_nb.train_data import batch_weights
from helpers import SAMPLES, make_run


@pytest.fixture(scope="module")
def masked(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("masks")
    data = root / "data"
    data.mkdir()
    for stem in ("green_square_spin", "rain_stripes"):
        for ext in (".mp4", ".txt"):
            shutil.copy(SAMPLES / f"{stem}{ext}", data / f"{stem}{ext}")
    mask = np.zeros((192, 192, 3), np.uint8)
    mask[:, 96:] = 255  # learn the right half only
    Image.fromarray(mask).save(data / "green_square_spin_mask.png")
    report = make_run(root / "run", tiny_ckpt, dataset_dir=str(data))
    build_cache(root / "run", log=lambda *a: None)
    return root / "run", report


def test_a_same_stem_mask_is_found_at_scan_and_is_not_a_sample(masked):
    _, report = masked
    by_clip = {r["file"].rsplit("/", 1)[-1]: r.get("mask") for r in report.records}
    assert set(by_clip) == {"green_square_spin.mp4", "rain_stripes.mp4"}
    assert by_clip["green_square_spin.mp4"].endswith("green_square_spin_mask.png")
    assert by_clip["rain_stripes.mp4"] is None
    assert not any("mask" in p.file for p in report.problems)


def test_the_mask_goes_onto_the_latent_grid_as_the_vae_groups_frames():
    pixels = np.zeros((9, 16, 16), np.float32)
    pixels[0] = 1.0  # latent frame 0 = pixel frame 0 alone
    pixels[5:9, :, 8:] = 1.0  # latent frame 2 = pixel frames 5..8, right half
    grid = to_latent_grid(pixels)
    assert grid.shape == (1, 3, 2, 2)
    assert grid[0, 0].eq(1).all() and grid[0, 1].eq(0).all()
    assert grid[0, 2, :, 0].eq(0).all() and grid[0, 2, :, 1].eq(1).all()


def test_the_mask_is_cached_with_its_sample_and_keys_its_latents(masked, tiny_ckpt):
    run, report = masked
    ds = CachedDataset(run)
    items = {it["source"].rsplit("/", 1)[-1]: it for it in (ds[i] for i in range(len(ds)))}
    m = items["green_square_spin.mp4"]["loss_mask"]
    assert m.shape == (1,) + tuple(items["green_square_spin.mp4"]["latents"].shape[1:])
    assert m[..., :3].eq(0).all() and m[..., 5:].eq(1).all()
    assert items["rain_stripes.mp4"]["loss_mask"] is None
    rec = next(r for r in report.records if r.get("mask"))
    ident = {"vae": "v"}
    assert latent_key(rec, ident, CacheSettings()) != latent_key({**rec, "mask": None}, ident, CacheSettings())


def test_the_masked_out_region_gives_zero_gradient_through_the_training_path(masked, tiny_ckpt):
    run, _ = masked
    ds = CachedDataset(run)
    item = next(ds[i] for i in range(len(ds)) if ds[i]["loss_mask"] is not None)
    dit = load_dit(tiny_ckpt, "cpu", torch.float32)
    torch.manual_seed(0)
    lora_lib.add_lora(dit, rank=4, alpha=4, targets=["attn"])
    outputs = []

    def keep_output(module, args, out):  # the DiT's prediction, with its gradient kept
        out.retain_grad()
        outputs.append(out)

    dit.register_forward_hook(keep_output)
    x0, text, mask, n = T.collate([item], "cpu", torch.float32)
    weights = batch_weights([item], "cpu")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    loss = T.flow_matching_loss(dit, x0, text, mask, torch.tensor([0.6]), noise, n, **weights)
    loss.backward()
    grad = outputs[0].grad[0]  # [C, T, h, w]
    learn = weights["loss_mask"][0, 0].expand_as(grad)
    assert grad[learn == 0].eq(0).all() and (learn == 0).sum() >= grad.numel() * 3 / 8
    assert grad[learn == 1].abs().gt(0).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dit.parameters() if p.requires_grad)
    # the loss is the mean over the learned cells: shrinking the mask does not shrink the loss
    err = (outputs[0][0] - (x0 - noise)[0]).detach().square()
    assert torch.allclose(loss.detach(), (err * learn).sum() / learn.expand_as(err).sum(), rtol=1e-5)


def test_a_run_with_masked_and_unmasked_samples_trains(masked, tmp_path):
    run, _ = masked
    update_section(run, "train", steps=2, rank=4, alpha=4, checkpoint_every=0, targets=["attn"], batch_size=2)
    res = T.train(run, log=lambda *a: None)
    assert res.steps == 2 and all(np.isfinite(res.losses))
