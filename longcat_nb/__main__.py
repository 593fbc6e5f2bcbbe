"""`python -m longcat_nb ...`: headless runs of the notebooks and small helpers."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
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

    args = ap.parse_args(argv)
    if args.cmd in ("run", "demo"):
        from .runner import DEMO_PARAMETERS, parse_parameters, run_notebooks

        params = parse_parameters(args.param)
        if args.cmd == "demo":
            params = {**DEMO_PARAMETERS, **params}
        outs = run_notebooks(args.notebooks if args.cmd == "run" else None, args.run_dir, params,
                             strict=args.cmd == "run")
        print(json.dumps({"run_dir": args.run_dir, "executed": [str(o) for o in outs]}, indent=2))
        return 0
    if args.cmd == "tiny-checkpoint":
        from .checkpoint import build_tiny_checkpoint

        path = build_tiny_checkpoint(args.dir, seed=args.seed, overwrite=args.overwrite)
        print(path)
        return 0
    if args.cmd == "env":
        from .envinfo import environment_report

        print(json.dumps(environment_report(), indent=2))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
