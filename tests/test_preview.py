"""The latent preview: the clean estimate it shows is the one the flow defines, and the projection maps
the 16 latent channels to RGB frames of the expected size."""
import numpy as np
import torch

from longcat_nb.flow import noisy_latents, velocity_target
from longcat_nb.preview import WAN21_LATENT_RGB_BIAS, clean_estimate, latent_rgb, preview_every


def test_clean_estimate_recovers_x0_from_a_perfect_velocity():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 16, 3, 4, 6, generator=g), torch.randn(1, 16, 3, 4, 6, generator=g)
    for sigma in (0.9, 0.5, 0.1):
        x_t = noisy_latents(x0, eps, torch.tensor([sigma]))
        assert torch.allclose(clean_estimate(x_t, velocity_target(x0, eps), sigma), x0, atol=1e-5)


def test_projection_shape_bias_and_channel_weights():
    z = torch.zeros(16, 2, 3, 5)
    frames = latent_rgb(z, upscale=4)
    assert frames.shape == (2, 12, 20, 3) and frames.dtype == np.uint8
    expected = np.round((np.array(WAN21_LATENT_RGB_BIAS) + 1) * 127.5)
    assert np.array_equal(frames[0, 0, 0], expected.astype(np.uint8))
    z[6] = 1.0  # channel 6 darkens every colour (negative weights in R, G and B)
    assert (latent_rgb(z).astype(int) < frames.astype(int)).all()


def test_preview_every_n_steps_only():
    shown = []
    cb = preview_every(2, lambda step, frames: shown.append((step, frames.shape)))
    lat = torch.zeros(1, 16, 2, 3, 4)
    for i in range(5):
        cb(i, 0.5, lat, lat)
    assert [s for s, _ in shown] == [1, 3] and shown[0][1] == (2, 12, 16, 3)
    assert preview_every(0, print) is None


def test_sampling_shows_the_clean_estimate_every_n_steps():
    from longcat_nb.model_files import load_components
    from longcat_nb.sampling import SampleRequest, generate

    comps = load_components("", device="cpu")
    shown = []
    req = SampleRequest(prompt="a red ball", height=64, width=64, num_frames=9, steps=4, guidance=1.0, seed=1)
    res = generate(comps, req, progress=False, preview=preview_every(2, lambda i, f: shown.append((i, f))))
    assert [i for i, _ in shown] == [1, 3]
    frames = shown[-1][1]  # 3 latent frames of 8x8, shown 4x larger
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    again = []
    generate(comps, req, progress=False, preview=preview_every(2, lambda i, f: again.append(f)))
    assert np.array_equal(again[-1], frames)  # the same seed shows the same estimate
    assert res.video.shape[0] == 9


def test_training_validation_shows_each_clip_forming(tiny_ckpt, tmp_path):
    import longcat_nb.train as T
    from longcat_nb.config import update_section
    from helpers import one_clip_run

    run = tmp_path / "run"
    one_clip_run(run, tiny_ckpt)
    update_section(run, "train", steps=2, rank=4, alpha=4, validate_every=2, validation_prompts=["a red ball"],
                   validation_height=64, validation_width=64, validation_frames=9, validation_steps=4,
                   validation_guidance=1.0)
    shown = []
    T.train(run, log=lambda *a: None, preview=preview_every(2, lambda i, f: shown.append((i, f.shape))))
    assert shown == [(1, (3, 32, 32, 3)), (3, (3, 32, 32, 3))]  # one clip, its steps 2 and 4
    assert (run / "samples" / "validation" / "step000002_0.mp4").is_file()
