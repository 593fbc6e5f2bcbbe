"""LoRA for the LongCat-Video DiT, by stage:

* ``inject``: add a trainable peft LoRA (targets, presets; the default targets are config.DEFAULT_TARGETS)
  and read/write the state dict of an injected adapter;
* ``formats``: the file layouts (peft/diffusers, official, ComfyUI), one module each, driven by one
  table (``formats.LAYOUTS``) for detection, loading and saving; ``state``: the internal (PEFT) layout
  they convert to and from;
* ``adapters``: stacking saved LoRAs on a model at sampling time, scales, removal, merging;
* ``export``: the trained adapter as files every consumer loads at the trained scale;
* ``kinds``: the adapter types beside LoRA (DoRA, LoHa, LoKr: peft's configs) and what differs for them;
* ``traceable``: those types' peft layers made traceable by torch.compile (no graph break in a block).
"""
from ..config import DEFAULT_TARGETS  # noqa: F401  (lora.DEFAULT_TARGETS is config's one list)
from .adapters import (activate_adapters, apply_loras, merge_lora_into_base, newest_lora,  # noqa: F401
                       remove_loras, set_lora_scales)
from .export import fold_alpha, run_metadata, save_layouts, save_trained, usage_of  # noqa: F401
from .formats import LAYOUTS, detect_layout, load_any_lora, load_lora_file, save_as  # noqa: F401
from .formats.comfy import COMFY_BLOCK_NAMES, COMFY_PREFIX, COMFY_TOP_NAMES, comfy_to_peft, peft_to_comfy, save_comfy  # noqa: F401
from .formats.official import (OFFICIAL_PREFIX, OFFICIAL_RANK, OFFICIAL_SEP, _official_name,  # noqa: F401
                               official_tensors, official_to_peft, official_usage, pad_rank, peft_to_official,
                               save_official, save_official_padded)
from .formats.peft import save_lora  # noqa: F401
from .kinds import ADAPTER_PARTS, adapter_of, merge_to_lora  # noqa: F401
from .inject import (PRESETS, TOP_LEVEL, add_lora, adapter_names, expand_targets, load_lora_state_dict,  # noqa: F401
                     lora_state_dict, module_ranks_alphas, resolve_target_modules)
from .state import PEFT_PREFIX, LoraError, LoraInfo, delta_weights  # noqa: F401
