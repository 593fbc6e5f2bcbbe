"""The VRAM planner against peaks measured on an H100 (docs/benchmarks.md, full-size DiT)."""
import pytest

from longcat_nb.planner import PlanSettings, plan, report, suggest

# (settings, measured peak max_memory_allocated in GiB) — runs 1-5 and 25 of docs/benchmarks.md.
# Runs 2-5 swapped blocks of quantized bases without moving them (the swap then assigned .data of the
# quanto/torchao tensor itself, which left the GPU copy): those rows are the settings without the swap.
MEASURED = [
    (PlanSettings(mode="sample"), 34.2),
    (PlanSettings(mode="sample", precision="int8"), 20.6),  # run 4: int8, "24 swapped", none moved
    (PlanSettings(), 53.9),
    (PlanSettings(precision="int8"), 43.2),
    (PlanSettings(precision="fp8"), 42.2),
    (PlanSettings(blocks_to_swap=24), 42.9),
    (PlanSettings(blocks_to_swap=12, activation_offload=True), 35.2),
    (PlanSettings(blocks_to_swap=40, activation_offload=True), 20.7),
    (PlanSettings(precision="int8", activation_offload=True), 30.6),  # run 5: "40 swapped", none moved
    (PlanSettings(precision="fp8", activation_offload=True), 27.3),  # run 5: "40 swapped", none moved
    (PlanSettings(precision="int8", activation_offload=True, compile=True), 24.28),  # run 25, compiled blocks
    (PlanSettings(precision="int8", activation_offload=True), 29.70),  # run 25, eager
    (PlanSettings(precision="int4", activation_offload=True, compile=True), 24.12),  # run 25: int4 runs eagerly
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


def test_swapped_sampling_host_ram_matches_the_capped_runs():
    """The 24 and 16 GiB cards' bf16 sampling (24 and 36 blocks swapped) peaked at 28.76 and 30.61 GiB
    host RAM on an H100 (docs/benchmarks.md run 29); the prediction stays within 5% of each."""
    from longcat_nb.planner import sampling_plan_settings, plan

    for swap, measured in ((24, 28.76), (36, 30.61)):
        s = sampling_plan_settings(480, 832, 93, guided=True, blocks_to_swap=swap, compile=True)
        assert abs(plan(s).host_ram_gib - measured) / measured < 0.05
    unswapped = plan(sampling_plan_settings(480, 832, 93, guided=True, compile=True))
    assert unswapped.host_ram_gib < 3  # the DiT goes straight to the GPU (the text encoder is counted apart)


def test_recommend_keeps_host_ram_in_budget_and_shortens_clips_last():
    from longcat_nb.planner import PlanSettings, recommend, usable_gib

    s = PlanSettings(compile=True)
    assert recommend(s, 80) == ({}, recommend(s, 80)[1])
    changes, p = recommend(s, 24)
    assert "num_frames" not in changes and p.peak_gib <= 23
    changes, p = recommend(s, 24, host_gib=32)
    assert p.host_ram_gib <= 32 and p.peak_gib <= 23 and "num_frames" not in changes
    assert changes["precision"] == "int8" and changes["blocks_to_swap"] > 0  # bf16 swapped needs > 32 GiB host
    changes, p = recommend(s, 16, host_gib=32)  # an int8 base streamed from host memory: still 93 frames
    assert "num_frames" not in changes and changes["precision"] == "int8" and changes["activation_offload"]
    assert p.peak_gib <= usable_gib(16) and p.host_ram_gib <= 32
    changes, p = recommend(s, 12, host_gib=32)  # 93 frames do not fit 12 GiB with any memory option
    assert changes["num_frames"] < 93 and (changes["num_frames"] - 1) % 4 == 0
    assert p.peak_gib <= usable_gib(12) and p.host_ram_gib <= 32


def test_int4_is_never_recommended_for_training_and_is_counted_eager():
    """int4 trains at 4x int8's step time and does not compile (run 25): no card's recommendation uses it,
    and a chosen int4 base is planned and timed as the eager run it is."""
    from longcat_nb.estimate import train_step_seconds
    from longcat_nb.planner import PlanSettings, recommend, usable_gib

    for gib in (10, 12, 16, 24, 48, 80):
        rec = recommend(PlanSettings(compile=True), gib, host_gib=32)
        assert rec is not None and rec[0].get("precision") != "int4", gib
    int4, int8 = (PlanSettings(precision=p, activation_offload=True, compile=True) for p in ("int4", "int8"))
    assert plan(int4).parts["block_working_set"] == plan(PlanSettings(precision="int4", activation_offload=True)).parts["block_working_set"]
    assert train_step_seconds(int4) > 4 * train_step_seconds(int8)
