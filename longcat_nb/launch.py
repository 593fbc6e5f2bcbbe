"""Training in a subprocess, from a notebook: ``torchrun --nproc_per_node N -m longcat_nb train``.

A notebook kernel is one process and cannot become N of them, so with several GPUs 03_train_lora
starts the trainer as a child process and follows it: every line the trainer prints is passed on, and
the JSON events of ``python -m longcat_nb train`` (one per step, one per validation) drive the same
loss plot and video display as the in-kernel run. Stopping the cell (KeyboardInterrupt) stops the
children; the newest checkpoint stays and the next launch resumes from it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_command(run_dir: str | os.PathLike, nproc: int, max_steps: Optional[int] = None) -> list[str]:
    """The command line: plain ``python -m longcat_nb train`` for one process, torchrun for more."""
    cmd = [sys.executable, "-m"]
    if nproc > 1:
        cmd += ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    cmd += ["longcat_nb", "train", "--run-dir", str(run_dir)]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    return cmd


class TrainingFailed(RuntimeError):
    """The training subprocess exited with an error; its last lines are in the message."""


def launch_training(run_dir: str | os.PathLike, nproc: int, on_step: Optional[Callable[[dict], None]] = None,
                    on_validation: Optional[Callable[[int, list], None]] = None,
                    log: Callable[[str], None] = print, max_steps: Optional[int] = None,
                    env: Optional[dict] = None) -> dict:
    """Run the trainer on ``nproc`` processes and follow it; returns the final 'done' event
    ({steps, lora, checkpoint}). ``on_validation(step, files)`` gets the written mp4 paths."""
    cmd = train_command(run_dir, nproc, max_steps)
    log("launching: " + " ".join(cmd))
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # a new process group, so stopping the cell stops torchrun and every worker it started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=child_env, start_new_session=True)
    done, tail, errors = None, [], []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            event = _event(line)
            if event is None:
                tail = (tail + [line])[-40:]
                log(line)
            elif event["event"] == "step":
                if on_step is not None:
                    on_step({k: v for k, v in event.items() if k != "event"})
            elif event["event"] == "validation":
                if on_validation is not None:
                    on_validation(int(event["step"]), [Path(p) for p in event["files"]])
            elif event["event"] == "done":
                done = event
            elif event["event"] == "error":
                errors.append(f"rank {event.get('rank', 0)}: {event.get('error', '')}")
                log(errors[-1])
        rc = proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        log("training stopped; the newest checkpoint is kept and the next launch resumes from it")
        raise
    if rc != 0:
        cause = "\n".join(dict.fromkeys(errors)) or "\n".join(tail)
        raise TrainingFailed(f"training exited with code {rc}:\n{cause}")
    if done is None:
        raise TrainingFailed("training ended without its final event; last output:\n" + "\n".join(tail))
    return done


def _event(line: str) -> Optional[dict]:
    # torchrun may prefix worker lines ("[rank0]:"); rank 0 prints steps, any rank its error
    start = line.find('{"event": ')
    if start < 0:
        return None
    try:  # the object alone: another process's output may follow it on the same line
        event, _ = json.JSONDecoder().raw_decode(line[start:])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
