"""Sampling with LongCat-Video, by step:

* ``request``: :class:`SampleRequest` (validated, with the fix named), the 04_sample form's values,
  sizes, and the conditioning image/video decoded as the official pipeline does;
* ``load``: the components with the memory options (precision, block swap, compile), placement while a
  model runs (offload='model'), the VRAM plan;
* ``pipeline``: text encoding, the KV cache, CFG-Zero*, the Euler loop, :func:`generate`, base vs LoRA;
* ``refine``: the 720p refinement stage; ``output``: the mp4 + JSON of a sample.

The time schedules live in ``flow`` (shared with training), LoRA stacking in ``lora.adapters``. Nothing
here imports the notebook layer: progress is a tqdm.auto bar or a factory the caller passes."""
from ..config import BASE_FPS, MODES, OFFLOAD  # noqa: F401  (the choices sampling takes: config's objects)
from ..flow import SCHEDULES, SHIFT, SampleError, set_scheduler, shift_sigmas, timesteps_for  # noqa: F401
from .load import base_precision, dit_dtype, load_sampling_components, placed, sampling_plan, vae_tiling  # noqa: F401
from .output import prompt_words, sample_stem, save_sample, settings_record, write_video  # noqa: F401
from .pipeline import (build_kv_cache, cfg_zero_star, compare_base_and_lora, denoise, encode_text,  # noqa: F401
                       generate, predict_velocity)
from .refine import refine, refinement_padding, upsample_for_refinement  # noqa: F401
from .request import (AUTO_KEYS, DEFAULT_GUIDANCE, DEFAULT_STEPS, DISTILL_LORA, DISTILLED_STEPS,  # noqa: F401
                      REFINE_LORA, T2V_SIZE, SampleRequest, SampleResult, auto_settings, center_crop, input_size,
                      keep_auto, load_image_frames, load_video_frames, preprocess_frames, request_from_values,
                      sample_size)
