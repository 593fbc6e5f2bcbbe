"""Training safety on the tiny model: divergence stops the run without saving NaN, checkpoints carry
checksums and a damaged one is skipped at resume, one trainer per run folder, an interrupt saves the
current step, every optimizer resumes exactly, and half-deleted checkpoint folders are cleaned up."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import longcat_nb.train as T
from longcat_nb.config import update_section
from helpers import REPO, fresh_copy, one_clip_run

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_ckpt):
    base = tmp_path_factory.mktemp("safety")
    one_clip_run(base / "src", tiny_ckpt)
    return base / "src"


def _run(cached, path, **train):
    run = fresh_copy(cached, path)
    update_section(run, "train", **{**dict(steps=4, rank=4, alpha=4, lr=1e-3, checkpoint_every=1,
                                           keep_checkpoints=5, seed=1, caption_dropout=0.3, dropout=0.1,
                                           targets=["attn"]), **train})
    return run


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _all_finite(folder):
    return all(torch.isfinite(t.float()).all() for f in folder.glob("*.safetensors") for t in load_file(f).values())


def _logged(run, **kw):
    lines = []
    res = T.train(run, log=lines.append, **kw)
    return res, lines


def test_divergence_stops_saves_no_nan_and_keeps_the_last_good_checkpoint(cached, tmp_path):
    run = _run(cached, tmp_path / "nan", steps=8, lr=1e12, keep_checkpoints=1, max_grad_norm=0.0)
    with pytest.raises(T.TrainingDiverged) as e:
        T.train(run, **QUIET)
    msg = str(e.value)
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert ckpts, "the last finite checkpoint must be kept"
    assert all(_all_finite(c) for c in ckpts)
    assert f"last good checkpoint is {ckpts[-1]}" in msg and "lr 1e+12" in msg
    bad_step = int(ckpts[-1].name.split("-")[1]) + 1
    assert f"step {bad_step}" in msg
    assert not (run / "lora").exists() or not list((run / "lora").iterdir())  # nothing exported


def test_checksum_catches_flipped_bytes_and_resume_falls_back(cached, tmp_path):
    run = _run(cached, tmp_path / "flip", steps=2)
    T.train(run, **QUIET)
    lora = run / "checkpoints" / "step-0000002" / "lora.safetensors"
    assert "sha256" in json.dumps(json.loads((lora.parent / "state.json").read_text())["files"])
    data = bytearray(lora.read_bytes())
    data[-64:-32] = b"\xff" * 32  # NaN weights, same size: only the checksum tells
    lora.write_bytes(bytes(data))
    update_section(run, "train", steps=3)
    res, lines = _logged(run)
    text = "\n".join(lines)
    assert "skipped" in text and str(lora) in text and "checksum" in text
    assert "resumed from step-0000001" in text
    assert res.steps == 3 and _all_finite(run / "checkpoints" / "step-0000003")


def test_truncated_checkpoint_is_skipped_and_resume_matches_an_uninterrupted_run(cached, tmp_path):
    full = T.train(_run(cached, tmp_path / "full"), **QUIET).losses
    run = _run(cached, tmp_path / "cut")
    T.train(run, max_steps=3, **QUIET)
    lora = run / "checkpoints" / "step-0000003" / "lora.safetensors"
    os.truncate(lora, lora.stat().st_size - 100)
    res, lines = _logged(run)
    skipped = [l for l in lines if "skipped" in l]
    assert len(skipped) == 1 and str(lora) in skipped[0], lines
    assert any("resumed from step-0000002" in l for l in lines)
    assert res.losses == full


def test_a_damaged_newer_checkpoint_is_set_aside_so_pruning_keeps_the_good_ones(cached, tmp_path):
    run = _run(cached, tmp_path / "aside", steps=3)
    T.train(run, **QUIET)
    for n in (2, 3):
        lora = run / "checkpoints" / f"step-000000{n}" / "lora.safetensors"
        os.truncate(lora, lora.stat().st_size - 100)
    update_section(run, "train", keep_checkpoints=1)
    res, lines = _logged(run, max_steps=2)
    assert res.steps == 2 and sum("skipped" in l for l in lines) == 2
    assert _steps(run) == ["damaged-step-0000002", "damaged-step-0000003", "step-0000002"]
    assert _all_finite(run / "checkpoints" / "step-0000002")


def test_a_live_trainer_lock_refuses_a_second_trainer_at_once(cached, tmp_path):
    run = _run(cached, tmp_path / "lock")
    lock = run / ".train.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))  # alive
    t0 = time.time()
    with pytest.raises(T.RunLocked) as e:
        T.train(run, **QUIET)
    assert time.time() - t0 < 5
    assert f"pid {os.getppid()} on {socket.gethostname()}" in str(e.value) and str(lock) in str(e.value)
    assert not (run / "checkpoints").exists() and not (run / "logs").exists()
    with pytest.raises(T.RunLocked):  # 03 asks before it writes config.json
        T.check_resume(run)


def test_a_dead_trainers_lock_is_taken_over_and_released(cached, tmp_path):
    run = _run(cached, tmp_path / "stale", steps=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    res, lines = _logged(run)
    assert res.steps == 1 and not (run / ".train.lock").exists()
    assert any(f"pid {dead.pid}" in l and "taken over" in l for l in lines)


def test_interrupt_in_a_callback_saves_the_step_and_resume_is_exact(cached, tmp_path):
    full = T.train(_run(cached, tmp_path / "full", steps=5, checkpoint_every=0), **QUIET).losses
    run = _run(cached, tmp_path / "int", steps=5, checkpoint_every=0)

    def stop_at_3(rec):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(T.TrainingInterrupted) as e:
        T.train(run, on_step=stop_at_3, **QUIET)
    assert "\n" not in str(e.value) and "step 3" in str(e.value)
    assert _steps(run) == ["step-0000003"]
    assert T.train(run, **QUIET).losses == full


def test_interrupt_inside_a_step_saves_the_last_whole_step_and_resume_is_exact(cached, tmp_path, monkeypatch):
    full = T.train(_run(cached, tmp_path / "full", steps=5, checkpoint_every=2), **QUIET).losses
    run = _run(cached, tmp_path / "mid", steps=5, checkpoint_every=2)
    loss, calls = T.flow_matching_loss, []

    def interrupted_on_4th(*a, **k):
        calls.append(1)
        out = loss(*a, **k)  # the forward ran (LoRA dropout drew random numbers), then the interrupt
        if len(calls) == 4:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(T, "flow_matching_loss", interrupted_on_4th)
    with pytest.raises(T.TrainingInterrupted):
        T.train(run, **QUIET)
    assert _steps(run) == ["step-0000002", "step-0000003"]
    monkeypatch.setattr(T, "flow_matching_loss", loss)
    assert T.train(run, **QUIET).losses == full


def test_interrupt_before_a_new_step_keeps_the_checkpoint_as_it_is(cached, tmp_path, monkeypatch):
    run = _run(cached, tmp_path / "after", steps=5, checkpoint_every=2)
    T.train(run, max_steps=2, **QUIET)
    before = (run / "checkpoints" / "step-0000002" / "state.json").read_text()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "flow_matching_loss", interrupted)
    with pytest.raises(T.TrainingInterrupted, match="step-0000002"):
        T.train(run, **QUIET)
    assert _steps(run) == ["step-0000002"]
    assert (run / "checkpoints" / "step-0000002" / "state.json").read_text() == before
    assert not (run / ".train.lock").exists()


def test_ctrl_c_while_a_step_is_logged_waits_until_every_log_has_it(tmp_path):
    """An interrupt that lands inside the logging of a step (here inside TensorBoard's first call)
    surfaces only once every log has the step: train.jsonl gets no half line, no logger is cut off."""
    from longcat_nb.loggers import RunLoggers

    calls = []

    class InterruptedOnce:
        def add_scalar(self, *a):
            calls.append(a[0])
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here, in the main thread, when nothing holds it

    logs = RunLoggers(tmp_path, {"train": {"wandb": "off"}})
    logs.tb = InterruptedOnce()
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whoever started pytest
    try:
        with pytest.raises(KeyboardInterrupt):
            logs.write({"step": 3, "loss": 0.5, "lr": 1e-4, "eval_loss": 0.4})
    finally:
        signal.signal(signal.SIGINT, before)
    assert calls == ["loss", "lr", "eval_loss"]
    assert [json.loads(l)["step"] for l in (tmp_path / "logs" / "train.jsonl").read_text().splitlines()] == [3]


def test_sigint_to_the_cli_saves_and_exits_with_one_line(cached, tmp_path):
    run = _run(cached, tmp_path / "cli", steps=10_000, checkpoint_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
           "PYTHONFAULTHANDLER": "1"}  # a SIGABRT then prints where every thread is
    # started with SIGINT ignored, as a script's background job is (CI may run so): the CLI still stops
    p = subprocess.Popen([sys.executable, "-m", "longcat_nb", "train", "--run-dir", str(run)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for line in p.stdout:
        if line.startswith('{"event": "step"') and json.loads(line)["step"] >= 2:
            break
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        out, err = p.communicate()
        pytest.fail(f"no stop 120 s after SIGINT; {out.count(chr(10))} more lines on stdout; where it was:\n"
                    f"{err[-6000:]}")
    assert p.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]  # the lines before it are the libraries' import noise
    assert "Traceback" not in err and last.startswith("stopped: interrupted at step"), err[-3000:]
    saved = _steps(run)
    assert len(saved) == 1 and saved[0] in last
    step = int(saved[0].split("-")[1])
    assert step >= 2 and not (run / ".train.lock").exists()
    update_section(run, "train", steps=step + 1)
    res, lines = _logged(run)
    assert res.steps == step + 1 and any(f"resumed from {saved[0]}" in l for l in lines)


@pytest.mark.parametrize("optimizer,module", [("adamw", None), ("adamw8bit", "bitsandbytes"),
                                              ("prodigy", "prodigyopt")])
def test_every_optimizer_saves_and_resumes_exactly(cached, tmp_path, optimizer, module):
    if module:
        pytest.importorskip(module)
    # rank 32 on the tiny model: A is 32 x 128 = 4096 values, where bitsandbytes starts keeping 8-bit state
    train = dict(optimizer=optimizer, rank=32, alpha=32, steps=4, checkpoint_every=2,
                 lr=1.0 if optimizer == "prodigy" else 1e-3)
    a = T.train(_run(cached, tmp_path / "a", **train), **QUIET)
    b = _run(cached, tmp_path / "b", **train)
    T.train(b, max_steps=2, **QUIET)
    resumed = T.train(b, **QUIET)
    assert resumed.losses == a.losses
    la = load_file(tmp_path / "a" / "checkpoints" / "step-0000004" / "lora.safetensors")
    lb = load_file(b / "checkpoints" / "step-0000004" / "lora.safetensors")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_bitsandbytes_8bit_state_round_trips_through_safetensors_and_json(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from longcat_nb import resume

    p = torch.nn.Parameter(torch.randn(64, 64))
    q = torch.nn.Parameter(torch.randn(8))
    opt = bnb.optim.AdamW8bit([p, q], lr=1e-3)
    p.grad, q.grad = torch.randn(64, 64), torch.randn(8)
    opt.step()
    sd = opt.state_dict()
    assert any(isinstance(v, dict) for v in sd["state"][0].values())  # the nested quantization state
    tensors, meta = resume.flatten_optimizer(opt)
    json.dumps(meta, allow_nan=False)  # strict JSON
    back = resume.unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    opt2 = bnb.optim.AdamW8bit([p, q], lr=1e-3)
    opt2.load_state_dict(back)
    flat = lambda d: {k: v for k, v in resume.flatten_optimizer(d)[0].items()}  # noqa: E731
    a, b = flat(opt), flat(opt2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert opt2.state_dict()["param_groups"] == sd["param_groups"]


def test_half_deleted_checkpoint_folders_are_removed_at_the_next_start(cached, tmp_path):
    run = _run(cached, tmp_path / "prune", steps=2)
    T.train(run, max_steps=1, **QUIET)
    ck = run / "checkpoints"
    (ck / "step-0000000").mkdir()  # pruning killed after state.json went
    (ck / "step-0000000" / "optimizer.safetensors").write_bytes(b"x" * 10)
    (ck / ".step-0000002.tmp").mkdir()  # a save killed half-way
    (ck / ".step-0000002.tmp" / "lora.safetensors").write_bytes(b"x")
    res, lines = _logged(run)
    assert res.steps == 2 and _steps(run) == ["step-0000001", "step-0000002"]
    assert any("step-0000000" in l and ".step-0000002.tmp" in l and "removed" in l for l in lines), lines


def test_out_of_memory_advice_walks_the_memory_options_in_order():
    from dataclasses import replace

    from longcat_nb.config import TrainSettings
    from longcat_nb.envinfo import gpu_memory_peaks
    from longcat_nb.train import _suggest_for_oom

    s = TrainSettings()
    assert "keep_attention='off'" in _suggest_for_oom(s, "selective")
    assert "activation_offload=True" in _suggest_for_oom(s, "full")
    s = replace(s, activation_offload=True)
    assert "base_precision='int8'" in _suggest_for_oom(s, "offload")
    s = replace(s, base_precision="int8")
    assert "blocks_to_swap to 8" in _suggest_for_oom(s, "offload")
    assert "blocks_to_swap to 44" in _suggest_for_oom(replace(s, blocks_to_swap=36), "offload")
    assert "resolution" in _suggest_for_oom(replace(s, blocks_to_swap=44), "offload")
    assert gpu_memory_peaks("cpu") == "not on a CUDA device"
