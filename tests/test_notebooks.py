"""The main job: every notebook headless, in order, on the tiny model and data_samples/."""
import json

from longcat_nb.runner import DEMO_PARAMETERS, list_notebooks, run_notebooks


def test_demo_runs_every_notebook(tmp_path, tiny_ckpt):
    params = dict(DEMO_PARAMETERS, checkpoint=str(tiny_ckpt), steps=20, validate_every=10,
                  validation_prompts=["a red ball"], validation_steps=2, validation_height=64,
                  validation_width=64, validation_frames=9, export_formats=["peft", "official", "comfy"])
    outs = run_notebooks(None, tmp_path, params, strict=False)
    assert [o.name for o in outs] == [p.name for p in list_notebooks()] and len(outs) == 5
    for o in outs:
        nb = json.loads(o.read_text())
        errors = [x for c in nb["cells"] for x in c.get("outputs", []) if x.get("output_type") == "error"]
        assert not errors, (o.name, errors[:1])
    assert (tmp_path / "dataset.jsonl").exists() and (tmp_path / "cache" / "manifest.json").exists()
    loras = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert loras == ["lora-step000020-comfy.safetensors", "lora-step000020-official.safetensors",
                     "lora-step000020.safetensors"]
    samples = sorted(p.name for p in (tmp_path / "samples").glob("*.mp4"))
    # 04's default prompt "A red ball bounces across ...": the first sample group of the run
    assert samples == ["001_t2v_seed0_a-red-ball-bounces_base.mp4", "001_t2v_seed0_a-red-ball-bounces_lora.mp4"]
    assert len(list((tmp_path / "samples" / "validation").glob("*.mp4"))) == 2
    # executed notebooks stay light (small previews)
    assert all(o.stat().st_size < 2_000_000 for o in outs)
    # the last cell of each notebook rewrote the one-page report; it shows the whole run now
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for section in ("settings", "dataset", "cache", "loss", "validation", "samples"):
        assert f"<section id='{section}'>" in page, section
    assert page.count("<video") >= 4 and "<svg" in page
