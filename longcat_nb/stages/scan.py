"""01_dataset without Jupyter: scan and validate the dataset folder, bucket it, write dataset.jsonl."""
from __future__ import annotations

from . import apply_settings, split_parameters


def run(run_dir, params: dict, log=print) -> dict:
    from ..checkpoint import load_tokenizer
    from ..data import check_samples, scan_dataset, write_dataset_jsonl
    from ..data.scan import describe_problems
    from ..runner import SAMPLES_DIR

    sections, _ = split_parameters("dataset", params)
    cfg = apply_settings(run_dir, sections)
    s = cfg.dataset
    folder = s.dataset_dir or str(SAMPLES_DIR)
    report = scan_dataset(folder, s, load_tokenizer(cfg.model.checkpoint))
    for line in describe_problems(report.problems):
        log(f"problem: {line}")
    check_samples(run_dir, report)  # no usable sample: stops here with the cause
    path = write_dataset_jsonl(run_dir, report)
    buckets = dict(report.buckets())
    log(f"wrote {path}: {len(report.records)} samples in {len(buckets)} bucket(s), {len(report.problems)} problem(s)")
    return {"samples": len(report.records), "problems": len(report.problems), "buckets": buckets,
            "dataset_jsonl": str(path)}
