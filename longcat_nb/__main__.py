"""`python -m longcat_nb ...`: headless runs of the notebooks and small helpers."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from .stages import STAGE_HELP

    ap = argparse.ArgumentParser(prog="python -m longcat_nb", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="execute notebooks headless with papermill (default: all, in order)")
    r.add_argument("notebooks", nargs="*", help="notebook files or stems, e.g. 00_setup or 00")
    r.add_argument("--run-dir", required=True, help="run folder (config.json, cache, checkpoints, ...)")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="papermill parameter (JSON value or text); repeatable")

    d = sub.add_parser("demo", help="the whole sequence on the tiny model and data_samples/")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")

    t = sub.add_parser("tiny-checkpoint", help="write the tiny deterministic checkpoint in the Hub layout")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")

    sub.add_parser("env", help="print the environment report as JSON")

    k = sub.add_parser("kernel", help="install the 'Python (longcat-nb)' Jupyter kernel (this Python, with the kit)")
    k.add_argument("--user", action="store_true",
                   help="install for your user, for a JupyterLab started from another environment "
                        "(default: into this environment)")
    k.add_argument("--prefix", default=None, help="install under this prefix instead (PREFIX/share/jupyter/kernels)")

    for name, text in STAGE_HELP.items():
        sp = sub.add_parser(name, help=text, description=text + ". Settings are written to RUN_DIR/config.json "
                            "(validated first); -p section.key=value reaches another section.")
        sp.add_argument("--run-dir", required=True)
        sp.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting (JSON value or text); repeatable")
        if name == "train":
            sp.add_argument("--max-steps", type=int, default=None, help="stop early (the schedule follows train.steps)")

    rp = sub.add_parser("report", help="write one HTML page with the run's settings, data, loss, videos")
    rp.add_argument("--run-dir", required=True)
    rp.add_argument("--out", default=None, help="default: RUN_DIR/report.html")

    nc = sub.add_parser("notebooks", help="keep the cells all notebooks share equal to longcat_nb/notebook_cells.py")
    nc_mode = nc.add_mutually_exclusive_group(required=True)
    nc_mode.add_argument("--sync", action="store_true", help="rewrite the shared cells from the source")
    nc_mode.add_argument("--check", action="store_true", help="exit 1, listing each notebook and cell that drifted")
    nc.add_argument("notebooks", nargs="*", help="notebook files or stems (default: every notebook in notebooks/)")

    st = sub.add_parser("settings", help="every setting with its default, allowed values and explanation")
    st.add_argument("--markdown", action="store_true", help="as README's settings table (the only format)")
    st.add_argument("--readme", default=None, metavar="README.md", help="rewrite the table between the markers there")

    return ap


def _run_notebooks(args) -> int:
    from .runner import DEMO_PARAMETERS, parse_parameters, run_notebooks

    params = parse_parameters(args.param)
    if args.cmd == "demo":
        params = {**DEMO_PARAMETERS, **params}
    outs = run_notebooks(args.notebooks if args.cmd == "run" else None, args.run_dir, params,
                         strict=args.cmd == "run")
    print(json.dumps({"run_dir": args.run_dir, "executed": [str(o) for o in outs]}, indent=2))
    return 0


def _tiny_checkpoint(args) -> int:
    from .model_files import build_tiny_checkpoint

    print(build_tiny_checkpoint(args.dir, seed=args.seed, overwrite=args.overwrite))
    return 0


def _stage(args) -> int:
    from .runner import parse_parameters
    from .stages import run_stage

    summary = run_stage(args.cmd, args.run_dir, parse_parameters(args.param), log=lambda m: print(m, flush=True))
    print(json.dumps({"event": "done", **summary}), flush=True)
    return 0


def _emit(event: dict) -> None:
    # one write per line: with several workers on one pipe (and PYTHONUNBUFFERED), print()'s separate
    # newline write lets another process's output land inside the line
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _train(args) -> int:
    from .runner import parse_parameters
    from .stages import run_stage

    def on_validation(step: int, videos: dict) -> None:
        _emit({"event": "validation", "step": step, "files": [str(p) for p, _ in videos.values() if p is not None]})

    params = parse_parameters(args.param)
    if args.max_steps is not None:
        params["max_steps"] = args.max_steps
    try:
        res = run_stage("train", args.run_dir, params, log=lambda m: print(m, flush=True),
                        on_step=lambda rec: _emit({"event": "step", **rec}), on_validation=on_validation)
    except KeyboardInterrupt as e:  # Ctrl-C: the step reached is saved (TrainingInterrupted says where)
        print(f"stopped: {e}" if str(e) else "stopped before training began; nothing was saved",
              file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # one line a launcher can show, from whichever rank failed
        _emit({"event": "error", "rank": int(os.environ.get("RANK", 0)), "error": f"{type(e).__name__}: {e}"})
        raise
    if res["lora"] is not None:
        _emit({"event": "done", **res})
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # under torchrun
        dist.destroy_process_group()
    return 0


def _report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def _kernel(args) -> int:
    from .runner import KERNEL_DISPLAY_NAME, NOTEBOOK_DIR, install_kernel

    dest = install_kernel(user=args.user, prefix=args.prefix)
    print(f"installed the Jupyter kernel '{KERNEL_DISPLAY_NAME}' ({sys.executable}) in {dest}")
    print(f"start `jupyter lab` in {NOTEBOOK_DIR.parent}, open notebooks/00_setup.ipynb and pick that kernel "
          "(Kernel > Change Kernel)")
    return 0


def _notebooks(args) -> int:
    from .notebook_cells import SYNC_COMMAND, check_notebooks, sync_notebooks

    if args.sync:
        for path in sync_notebooks(args.notebooks):
            print(f"synced {path}")
        return 0
    drifts = check_notebooks(args.notebooks)
    for drift in drifts:
        print(drift)
    if drifts:
        print(f"run `{SYNC_COMMAND}` (or move the change into longcat_nb/notebook_cells.py first)")
    return 1 if drifts else 0


def _settings(args) -> int:
    from .settings_doc import settings_markdown, write_readme_table

    if args.readme:
        print(f"{args.readme}: {'rewritten' if write_readme_table(Path(args.readme)) else 'already up to date'}")
        return 0
    print(settings_markdown(), end="")
    return 0


def _env(args) -> int:
    from .envinfo import environment_report

    print(json.dumps(environment_report(), indent=2))
    return 0


COMMANDS = {"run": _run_notebooks, "demo": _run_notebooks, "tiny-checkpoint": _tiny_checkpoint, "report": _report,
            "kernel": _kernel, "notebooks": _notebooks, "settings": _settings, "env": _env}


def _command(name: str):
    """The function of a command: the table above, or a stage (train streams its steps as JSON lines)."""
    return COMMANDS.get(name) or (_train if name == "train" else _stage)


def _sigint_stops() -> None:
    """A script's background job (``cmd &`` in a non-interactive shell) starts with SIGINT ignored; an
    explicit ``kill -INT`` must still save and stop a stage, as Ctrl-C does."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _sigint_stops()
    if getattr(args, "run_dir", None) is not None:
        from .paths import resolve_run_dir

        args.run_dir = str(resolve_run_dir(args.run_dir))  # relative: the same folder a notebook kernel uses
    return _command(args.cmd)(args)


if __name__ == "__main__":
    sys.exit(main())
