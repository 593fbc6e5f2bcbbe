"""Validation clips during training: the validation prompts sampled with the model being trained,
through the kit's sampler, every ``validate_every`` steps."""
from __future__ import annotations

from pathlib import Path

from .paths import resolve_path


class Validator:
    """Samples the validation prompts with the model being trained, through the kit's sampler.
    Prompts are encoded once up front, with the text encoder the cache was built with (the checkpoint's
    UMT5, or Qwen2.5-VL; refused with the reason when that cannot be loaded), and the encoder freed;
    the VAE is loaded only to decode. ``preview(i, σ, latents, v)``: the sampler's latent preview
    (longcat_nb.preview), called before every denoising step of every clip."""

    def __init__(self, run_dir: Path, cfg, save: bool = True, preview=None):
        from .model_files import (list_checkpoint_loras, load_scheduler, load_text_encoder, load_tokenizer, pick_device,
                                 pick_dtype, resolve_checkpoint)
        from .sampling.request import DISTILL_LORA
        from .text import encode_prompts, named_encoder, run_text_encoder

        self.run_dir, self.cfg, self.save, self.preview, s = Path(run_dir), cfg, save, preview, cfg.train
        # checked now, not at the first validation step hours later
        given = [str(x or "") for x in list(s.validation_images) + [""] * len(s.validation_prompts)]
        self.images = [str(resolve_path(x)) if x else "" for x in given]  # relative: under the workspace root
        for i, image in enumerate(self.images[:len(s.validation_prompts)]):
            if image and not Path(image).is_file():
                raise FileNotFoundError(f"validation_images[{i}] = {given[i]!r} does not exist ({image}): give an "
                                        "image file (png/jpg) for an image-to-video validation prompt, or \"\" for "
                                        "text-to-video")
        dev = pick_device(cfg.model.device)
        self.text_encoder = run_text_encoder(self.run_dir)
        if self.text_encoder is None:
            tok = load_tokenizer(cfg.model.checkpoint)
            enc = load_text_encoder(cfg.model.checkpoint, dev)
            self.texts = [encode_prompts(tok, enc, ["", p], device="cpu") for p in s.validation_prompts]
        else:  # the LoRA learns on these embeddings: validation prompts must be encoded the same way
            enc = named_encoder(self.text_encoder, dev, pick_dtype(cfg.model.text_encoder_dtype, dev),
                                f"validation (validate_every=0 trains without it), run {self.run_dir}")
            self.texts = [enc(["", p]) for p in s.validation_prompts]
        del enc
        self.scheduler = load_scheduler(cfg.model.checkpoint)
        self.loras = list_checkpoint_loras(resolve_checkpoint(cfg.model.checkpoint))
        if s.validation_distilled and DISTILL_LORA not in self.loras:  # now, not at the first validation
            raise FileNotFoundError(
                f"validation_distilled=True needs {resolve_checkpoint(cfg.model.checkpoint)}/lora/{DISTILL_LORA}"
                ".safetensors (the lora/ folder of meituan-longcat/LongCat-Video): download it, or set "
                "validation_distilled=False")

    def __call__(self, step: int, model) -> dict:
        from .model_files import Components, load_vae, resolve_checkpoint
        from .sampling import SampleRequest, generate, save_sample

        s = self.cfg.train
        vae = load_vae(self.cfg.model.checkpoint, next(model.parameters()).device)
        # the record's 'checkpoint' is the model the LoRA is trained on; the LoRA is this run's at `step`
        comps = Components(folder=resolve_checkpoint(self.cfg.model.checkpoint), dit=model, vae=vae,
                           scheduler=self.scheduler, loras=self.loras)
        # distilled: the checkpoint's distill LoRA stacked under the one being trained, its own steps, no CFG
        fast = dict(distilled=True) if s.validation_distilled else \
            dict(steps=s.validation_steps, guidance=s.validation_guidance)
        saved = self.run_dir / "checkpoints" / f"step-{step:07d}"
        out = {}
        for i, (prompt, text, image) in enumerate(zip(s.validation_prompts, self.texts, self.images)):
            req = SampleRequest(prompt=prompt, mode="i2v" if image else "t2v", image=image or None,
                                height=s.validation_height, width=s.validation_width,
                                num_frames=s.validation_frames, seed=s.seed + i, **fast)
            res = generate(comps, req, text=text, progress=False, preview=self.preview)
            res.settings.update(lora_step=step, lora_run=str(self.run_dir),
                                text_encoder=(self.text_encoder or {"name": "umt5"})["name"],
                                lora_checkpoint=str(saved) if (saved / "state.json").exists() else "")
            path = save_sample(res, self.run_dir, f"validation/step{step:06d}_{i}") if self.save else None
            out[f"{i}: {prompt}"] = (path, res.video)
        del vae
        return out
