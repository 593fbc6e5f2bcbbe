"""01_dataset without Jupyter: scan and validate the dataset folder, bucket it, write dataset.jsonl."""
from __future__ import annotations

from . import apply_settings, split_parameters


def run(run_dir, params: dict, log=print) -> dict:
    from ..model_files import load_tokenizer
    from ..data import check_samples, write_dataset_jsonl
    from ..data.datasets import scan_datasets
    from ..data.scan import describe_problems
    from ..runner import SAMPLES_DIR

    sections, _ = split_parameters("dataset", params)
    cfg = apply_settings(run_dir, sections)
    s = cfg.dataset
    report = scan_datasets(s, load_tokenizer(cfg.model.checkpoint), default_dir=str(SAMPLES_DIR))
    for line in describe_problems(report.problems):
        log(f"problem: {line}")
    check_samples(run_dir, report)  # no usable sample: stops here with the cause
    path = write_dataset_jsonl(run_dir, report)
    buckets = dict(report.buckets())
    log(f"wrote {path}: {len(report.records)} samples in {len(buckets)} bucket(s), {len(report.problems)} problem(s)")
    for row in report.entries if len(report.entries) > 1 else []:
        log(f"entry {row['entry']} ({row['role']}, {row['dataset_dir']}): {row['samples']} sample(s) x "
            f"{row['repeats']} = {row['share of epoch']} of an epoch, {row['eval samples']} held out for eval")
    return {"samples": len(report.records), "problems": len(report.problems), "buckets": buckets,
            "dataset_jsonl": str(path), "entries": report.entries}
