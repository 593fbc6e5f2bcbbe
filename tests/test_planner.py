"""The VRAM planner against peaks measured on an H100 (docs/benchmarks.md, full-size DiT)."""
import pytest

from longcat_nb.planner import PlanSettings, plan, report, suggest

# (settings, measured peak max_memory_allocated in GiB) — runs 1-5 of docs/benchmarks.md
MEASURED = [
    (PlanSettings(mode="sample"), 34.2),
    (PlanSettings(mode="sample", precision="int8", blocks_to_swap=24), 20.6),
    (PlanSettings(), 53.9),
    (PlanSettings(precision="int8"), 43.2),
    (PlanSettings(precision="fp8"), 42.2),
    (PlanSettings(blocks_to_swap=24), 42.9),
    (PlanSettings(blocks_to_swap=12, activation_offload=True), 35.2),
    (PlanSettings(blocks_to_swap=40, activation_offload=True), 20.7),
    (PlanSettings(precision="int8", blocks_to_swap=40, activation_offload=True), 30.6),
    (PlanSettings(precision="fp8", blocks_to_swap=40, activation_offload=True), 27.3),
    (PlanSettings(compile=True), 51.6),
    (PlanSettings(mode="sample", compile=True), 30.6),  # H200, compiled blocks (run 12)
    (PlanSettings(mode="sample", precision="fp8_rowwise", compile=True), 18.9),
]


@pytest.mark.parametrize("settings,measured", MEASURED)
def test_prediction_within_15_percent(settings, measured):
    predicted = plan(settings).peak_gib
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


def test_suggestion_fits_a_24_gb_card():
    s = PlanSettings()
    label, p = suggest(s, 23.0)
    assert p.peak_gib <= 23.0 and "blocks_to_swap" in label
    rep = report(s, gpu_gib=24.0)
    assert rep["fits"] is False and "blocks_to_swap" in rep["advice"]
    assert report(s, gpu_gib=80.0)["fits"] is True


def test_scaling_with_resolution_and_rank():
    small = plan(PlanSettings(height=240, width=416, num_frames=45)).peak_gib
    assert small < plan(PlanSettings()).peak_gib
    assert plan(PlanSettings(rank=128)).parts["lora_and_optimizer"] > plan(PlanSettings()).parts["lora_and_optimizer"]
