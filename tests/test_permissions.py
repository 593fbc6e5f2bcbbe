"""Every file the kit writes gets the permissions a plain open() gives under the umask (0666 & ~umask;
folders 0777 & ~umask), never tempfile's 0600/0700: a sample, a LoRA, a checkpoint or the report
written to a temporary name and renamed must stay readable by whoever may read the run folder."""
import os
import stat

import torch

from longcat_nb import lora as L
from longcat_nb.model_files import build_tiny_checkpoint, load_components
from longcat_nb.config import TrainSettings, update_section
from longcat_nb.data.video import write_mp4
from longcat_nb.report import write_report
from longcat_nb.sampling import SampleRequest, generate, save_sample, write_video
from longcat_nb.train import save_checkpoint

UMASK = 0o027  # not the usual 0o022, so a file that merely got the default would show up


def _modes(root):
    for dirpath, dirnames, filenames in os.walk(root):
        yield dirpath, stat.S_IMODE(os.stat(dirpath).st_mode), True
        for name in filenames:
            p = os.path.join(dirpath, name)
            yield p, stat.S_IMODE(os.stat(p).st_mode), False


def test_every_file_written_follows_the_umask(tmp_path, tiny_ckpt, monkeypatch):
    import longcat_nb.cache as cache

    comps = load_components(tiny_ckpt, device="cpu")
    old = os.umask(UMASK)
    try:
        run = tmp_path / "run"
        update_section(run, "sample", prompt="a red ball")
        res = generate(comps, SampleRequest("a red ball", height=64, width=64, num_frames=5, steps=1), progress=False)
        save_sample(res, run, "001_t2v_seed0_a-red-ball_base")  # PyAV + the settings JSON
        save_sample(res, run, "001_t2v_seed0_a-red-ball_base")  # taken: the -2 copy
        write_mp4(run / "clips" / "pyav.mp4", res.video, 15)  # PyAV
        write_video(run / "clips" / "fallback.mp4", res.video, 15)
        dit = comps.dit
        L.add_lora(dit, rank=2, alpha=2, adapter_name="default")
        try:
            state = L.lora_state_dict(dit)
            meta = {"rank": 2, "alpha": 2}
            L.save_lora(run / "lora" / "lora-step000001.safetensors", state, meta)
            L.save_official(run / "lora" / "lora-step000001-official.safetensors", state, meta)
            L.save_comfy(run / "lora" / "lora-step000001-comfy.safetensors", state, meta)
            params = [p for p in dit.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3)
            params[0].grad = torch.ones_like(params[0])
            opt.step()
            save_checkpoint(run / "checkpoints", 1, dit, opt, {"epoch": 0, "batch": 1}, [0.5], TrainSettings(), keep=2)
        finally:
            L.remove_loras(dit)
        (run / "cache").mkdir()
        with cache._build_lock(run / "cache"):  # os.open's default mode is 0o777: the lock must not be executable
            lock_mode = stat.S_IMODE(os.stat(run / "cache" / ".lock").st_mode)
        write_report(run)
        build_tiny_checkpoint(tmp_path / "ckpt")
    finally:
        os.umask(old)

    assert lock_mode == 0o666 & ~UMASK
    seen = list(_modes(run)) + list(_modes(tmp_path / "ckpt"))
    names = {os.path.relpath(p, tmp_path) for p, _, is_dir in seen if not is_dir}
    for want in ("run/samples/001_t2v_seed0_a-red-ball_base.mp4", "run/samples/001_t2v_seed0_a-red-ball_base-2.json",
                 "run/clips/pyav.mp4", "run/clips/fallback.mp4", "run/lora/lora-step000001-comfy.safetensors",
                 "run/checkpoints/step-0000001/optimizer.safetensors", "run/report.html", "run/config.json",
                 "ckpt/dit/config.json"):
        assert want in names, (want, sorted(names))
    wrong = [(os.path.relpath(p, tmp_path), oct(mode)) for p, mode, is_dir in seen
             if mode != (0o777 if is_dir else 0o666) & ~UMASK]
    assert not wrong, wrong
