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


def test_host_ram_is_the_larger_phase_not_the_sum():
    from longcat_nb.planner import DEPTH, GIB, HOST_BASE_GIB, PlanSettings, block_bytes, plan

    s = PlanSettings(blocks_to_swap=32, activation_offload=True, compile=True)
    p = plan(s)
    loading = DEPTH * block_bytes("bf16") / GIB
    running = (32 * block_bytes("bf16") + DEPTH * 37_440 * 4096 * 2) / GIB  # pinned blocks + block inputs
    assert abs(p.host_ram_gib - (max(loading, running) + HOST_BASE_GIB)) < 1e-6
    assert p.host_ram_gib < loading + running  # the sum over-predicted by about 25 GiB


def test_recommend_keeps_host_ram_in_budget_and_shortens_clips_last():
    from longcat_nb.planner import PlanSettings, recommend

    s = PlanSettings(compile=True)
    assert recommend(s, 80) == ({}, recommend(s, 80)[1])
    changes, p = recommend(s, 24)
    assert "num_frames" not in changes and p.peak_gib <= 23
    changes, p = recommend(s, 24, host_gib=32)
    assert p.host_ram_gib <= 32 and p.peak_gib <= 23 and "num_frames" not in changes
    changes, p = recommend(s, 16, host_gib=32)  # 93 frames do not fit 16 GiB with any memory option
    assert changes["num_frames"] < 93 and (changes["num_frames"] - 1) % 4 == 0
    assert p.peak_gib <= 15 and p.host_ram_gib <= 32
