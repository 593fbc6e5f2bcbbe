"""The dataset stage: scan and validate clips, cut windows, assign buckets, decode frames."""
from .buckets import Bucket, BucketError, aspect_buckets, assign_bucket
from .scan import (EmptyDatasetError, Problem, ScanReport, check_samples, read_dataset_jsonl, require_samples,
                   scan_dataset, write_dataset_jsonl)
from .video import load_condition_image, load_sample_frames, probe, write_mp4

__all__ = ["Bucket", "BucketError", "aspect_buckets", "assign_bucket", "EmptyDatasetError", "Problem",
           "ScanReport", "check_samples", "read_dataset_jsonl", "require_samples", "scan_dataset",
           "write_dataset_jsonl", "load_condition_image", "load_sample_frames", "probe", "write_mp4"]
