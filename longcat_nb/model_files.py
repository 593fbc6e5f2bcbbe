"""The model folder (a "checkpoint" in Hub terms, setting model.checkpoint): Hub layout, loading each
component, and the tiny default model in that layout.

Layout (official ``meituan-longcat/LongCat-Video``, spec §1.1)::

    dit/          LongCatVideoTransformer3DModel (config.json + sharded safetensors + index)
    vae/          diffusers AutoencoderKLWan
    text_encoder/ transformers UMT5EncoderModel
    tokenizer/    AutoTokenizer (UMT5 SentencePiece)
    scheduler/    diffusers FlowMatchEulerDiscreteScheduler (shift 12)
    lora/         optional: cfg_step_lora.safetensors, refinement_lora.safetensors

The tiny default checkpoint has the same layout and classes with small sizes and deterministic
weights, so every code path that serves the real 13.6B model is exercised on a laptop CPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .io import set_plain_modes
from .models import LongCatVideoTransformer3DModel
from .paths import resolve_path

PARTS = ("tokenizer", "text_encoder", "vae", "scheduler", "dit")
HUB_REPO = "meituan-longcat/LongCat-Video"
TINY_VERSION = "1"

GET_REAL = (
    f"download the official checkpoint with `hf download {HUB_REPO} --local-dir DIR` (`pip install -U "
    "huggingface_hub` gives the `hf` command) and point the kit at DIR, or leave the checkpoint empty to use "
    "the tiny default model (`python -m longcat_nb tiny-checkpoint DIR` builds one)"
)


class CheckpointError(FileNotFoundError):
    """A checkpoint folder is missing or has a missing/broken component."""


# ---------------------------------------------------------------------------------------------
# dtype / device
# ---------------------------------------------------------------------------------------------
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def pick_device(device: str = "auto") -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' means bfloat16 on an accelerator and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


# ---------------------------------------------------------------------------------------------
# checkpoint folder
# ---------------------------------------------------------------------------------------------
def default_home() -> Path:
    return Path(os.environ.get("LONGCAT_NB_HOME", Path.home() / ".cache" / "longcat_nb"))


def tiny_checkpoint_dir() -> Path:
    return default_home() / f"tiny-v{TINY_VERSION}"


def resolve_checkpoint(checkpoint: str | os.PathLike | None = "") -> Path:
    """An empty value means the tiny default checkpoint, built on first use."""
    if not checkpoint:
        path = tiny_checkpoint_dir()
        if not (path / "dit" / "config.json").exists():
            build_tiny_checkpoint(path)
        return path
    path = resolve_path(checkpoint)  # relative: under the workspace root, as run_dir (paths.py)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist: {GET_REAL}")
    return path


# What a loader opens in each part besides its weights (those are checked against their index).
_PART_FILES = {"tokenizer": (), "text_encoder": ("config.json",), "vae": ("config.json",),
               "scheduler": ("scheduler_config.json",), "dit": ("config.json",)}


# the weights file from_pretrained opens when there is no shard index (diffusers' name, transformers')
_WEIGHTS = {"dit": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
            "text_encoder": "model.safetensors"}


def _missing_weights(sub: Path, part: str) -> list[str]:
    index = sub / (_WEIGHTS[part] + ".index.json")
    if not index.is_file():
        return [] if (sub / _WEIGHTS[part]).is_file() else [f"{part}/{_WEIGHTS[part]}"]
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return []  # a damaged index: the loader names it (_load_or_explain)
    return [f"{part}/{name}" for name in shards if not (sub / name).is_file()]


def missing_files(folder: Path, part: str) -> list[str]:
    """The files of one part (``dit/``, ``dit/config.json``, a shard ...) that are not in ``folder``."""
    sub = folder / part
    if not sub.is_dir():
        return [f"{part}/"]
    missing = [f"{part}/{name}" for name in _PART_FILES[part] if not (sub / name).is_file()]
    if part == "tokenizer":
        if not any((sub / name).is_file() for name in ("tokenizer.json", "spiece.model")):
            missing.append("tokenizer/tokenizer.json (or spiece.model)")
    elif part != "scheduler":
        missing += _missing_weights(sub, part)
    return missing


def check_checkpoint(checkpoint: str | os.PathLike | None = "", parts: Iterable[str] = PARTS) -> Path:
    """The checkpoint folder, once every file the loaders of ``parts`` open is there; else one error that
    lists everything missing and the download that brings it."""
    folder = resolve_checkpoint(checkpoint)
    parts = list(parts)
    missing = {part: files for part in parts if (files := missing_files(folder, part))}
    if missing:
        include = " ".join(f"--include '{part}/*'" for part in missing)
        raise CheckpointError(
            f"checkpoint folder {folder} is incomplete: missing {', '.join(f for m in missing.values() for f in m)}. "
            f"Download the missing part(s) with `hf download {HUB_REPO} --local-dir {folder} {include}` (or the "
            "whole repository without --include), or leave the checkpoint empty to use the tiny default model."
        )
    return folder


def _load_or_explain(part: str, folder: Path, fn):
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:  # broken json, truncated shard, wrong class ...
        raise CheckpointError(
            f"could not load {folder / part}: {type(e).__name__}: {e}. The folder looks damaged; "
            f"re-download that subfolder. ({GET_REAL})"
        ) from e


def load_tokenizer(checkpoint: str | os.PathLike | None = ""):
    from transformers import AutoTokenizer

    folder = check_checkpoint(checkpoint, ["tokenizer"])
    return _load_or_explain("tokenizer", folder, lambda: AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"))


def load_text_encoder(checkpoint="", device="cpu", dtype: Any = "auto"):
    """UMT5EncoderModel of text_encoder/. On the CPU through from_pretrained (its weights stay mapped
    from the files and are read as used). On an accelerator layer by layer (:func:`_fill_from_files`),
    each tensor read straight onto it: from_pretrained keeps every shard mapped until it is done, and
    the mapped pages of the 11 GiB encoder (21 GiB in fp32 shards) then count in host RAM (run 27)."""
    from transformers import UMT5EncoderModel

    folder = check_checkpoint(checkpoint, ["text_encoder"])
    dtype = pick_dtype(dtype, device)
    if torch.device(device).type != "cpu":
        return _load_or_explain("text_encoder", folder, lambda: _load_text_encoder_by_layer(folder, device, dtype))
    model = _load_or_explain(
        "text_encoder", folder,
        lambda: UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype),
    )
    return model.eval().requires_grad_(False)


def _loading(items, desc: str):
    """A progress bar over the parts a layer-by-layer load reads (from_pretrained shows its own per
    shard): the 25 GiB DiT from a slow disk takes minutes, which should not look like a hang."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"loading {desc}", unit="", leave=False)


def _load_text_encoder_by_layer(folder: Path, device, dtype):
    """load_text_encoder on an accelerator: an empty UMT5EncoderModel of text_encoder/config.json,
    filled one encoder layer at a time, then the token table and the final norm. The token table is
    tied to the encoder's embedding unless the files hold both (then each keeps its own, as
    from_pretrained does); float16 keeps the feed-forward output projections in float32, as
    UMT5's ``_keep_in_fp32_modules``."""
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel

    with init_empty_weights():
        model = UMT5EncoderModel(UMT5Config.from_pretrained(folder / "text_encoder"))
    weights = _weight_map(folder, "text_encoder")
    tied = "encoder.embed_tokens.weight"
    names = set(model.state_dict()) - ({tied} if tied not in weights else set())
    _check_names("text_encoder", names, weights)
    keep_fp32 = (lambda name: ".wo." in name) if dtype == torch.float16 else None
    for i in _loading(range(len(model.encoder.block)), "text encoder layers"):
        _fill_from_files(model, weights, [n for n in weights if n.startswith(f"encoder.block.{i}.")], device,
                         dtype, keep_fp32)
    _fill_from_files(model, weights, [n for n in weights if not n.startswith("encoder.block.")], device, dtype)
    if tied not in weights:
        model.encoder.embed_tokens.weight = model.shared.weight
    return model.to(device).eval().requires_grad_(False)  # the buffers, which stayed on the CPU


def load_vae(checkpoint="", device="cpu", dtype: Any = "auto"):
    from diffusers import AutoencoderKLWan

    folder = check_checkpoint(checkpoint, ["vae"])
    dtype = pick_dtype(dtype, device)
    # The Wan VAE is small (0.25 GB) and its causal convs lose detail in bf16 on CPU; float32 there.
    vae = _load_or_explain(
        "vae", folder, lambda: AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    )
    return vae.to(device).eval().requires_grad_(False)


def load_scheduler(checkpoint=""):
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = check_checkpoint(checkpoint, ["scheduler"])
    return _load_or_explain(
        "scheduler", folder,
        lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


def load_dit(checkpoint="", device="cpu", dtype: Any = "auto", attention: Optional[str] = None,
             each_block: Optional[Callable[[Any], None]] = None):
    """Load the DiT through diffusers: shards are read one at a time into an empty (meta) model,
    so host memory never holds two copies of the weights; on an accelerator each shard goes straight
    to it (device_map), so host memory never holds the whole model either.

    ``each_block(block)``: the model is filled block by block instead (:func:`_load_dit_by_block`),
    each block's tensors read from its shards straight onto ``device`` and handed to ``each_block``
    as soon as they are in (to quantize it there): neither host memory nor the device ever holds the
    unquantized model, which a 24 GiB card's quantized base needs. On the CPU that path gives tensors
    in memory of their own, no file left mapped: block swap's host-side model reads it so."""
    if each_block is not None:
        return _load_dit_by_block(checkpoint, device, dtype, attention, each_block)
    folder = check_checkpoint(checkpoint, ["dit"])
    dtype = pick_dtype(dtype, device)
    place = {} if torch.device(device).type == "cpu" else {"device_map": {"": torch.device(device)}}
    model = _load_or_explain(
        "dit", folder,
        lambda: LongCatVideoTransformer3DModel.from_pretrained(
            folder, subfolder="dit", torch_dtype=dtype, cp_split_hw=None, low_cpu_mem_usage=True, **place
        ),
    )
    if attention:
        model.set_attention_backend(attention)
    return model.to(device).eval().requires_grad_(False)


def _weight_map(folder: Path, part: str) -> dict:
    """Each tensor name of ``part``/ -> the safetensors file that holds it (its index, or its one file)."""
    from safetensors import safe_open

    sub = folder / part
    index = sub / (_WEIGHTS[part] + ".index.json")
    if index.is_file():
        return {k: sub / f for k, f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    with safe_open(str(sub / _WEIGHTS[part]), "pt") as f:
        return {k: sub / _WEIGHTS[part] for k in f.keys()}


def _check_names(part: str, expected: set, weights: dict) -> None:
    """Names missing from or extra to the files are an error, as from_pretrained."""
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing or extra:
        raise ValueError(f"the weights do not match {part}/config.json: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")


_READ_CHUNK = 256 << 20  # bytes of one tensor read while its file is open (the text encoder's token table is 2 GiB)
_ITEMSIZE = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _fill_from_files(model, weights: dict, names, device, dtype, keep_fp32=None) -> None:
    """Read ``names`` (floating tensors cast to ``dtype``; float32 where ``keep_fp32(name)``) from their
    safetensors files into ``model``'s empty (meta) tensors on ``device``. Host RAM keeps no mapped
    pages of the files: a file is open only while these names are read, a tensor larger than
    _READ_CHUNK is read a slice of rows at a time with the file reopened for each, and on the CPU each
    tensor is copied into memory of its own (safetensors' CPU tensors are views of the mapped file,
    which would keep its pages in host RAM beside the copies made from them: block swap's pinned ones)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    def target(key, t):
        if not t.is_floating_point():
            return t.dtype, None
        want = torch.float32 if keep_fp32 and keep_fp32(key) else dtype
        return want, want

    by_file: dict = {}
    for name in names:
        by_file.setdefault(weights[name], []).append(name)
    for file, keys in by_file.items():
        big = []
        with safe_open(str(file), "pt", device=str(device)) as f:
            for key in keys:
                sl = f.get_slice(key)
                shape, itemsize = sl.get_shape(), _ITEMSIZE.get(sl.get_dtype(), 4)
                if len(shape) > 1 and math.prod(shape) * itemsize > _READ_CHUNK:
                    big.append((key, shape, max(1, _READ_CHUNK // (math.prod(shape[1:]) * itemsize))))
                    continue
                t = f.get_tensor(key)
                want, cast = target(key, t)
                set_module_tensor_to_device(model, key, device, value=t.to(want, copy=device.type == "cpu"),
                                            dtype=cast)
        for key, shape, rows in big:
            dst = cast = None
            for r in range(0, shape[0], rows):
                with safe_open(str(file), "pt", device=str(device)) as f:
                    part = f.get_slice(key)[r:r + rows]
                if dst is None:
                    want, cast = target(key, part)
                    dst = torch.empty(shape, dtype=want, device=device)
                dst[r:r + rows].copy_(part)
                del part  # on the CPU, the last view of the mapped file: it is unmapped now
            set_module_tensor_to_device(model, key, device, value=dst, dtype=cast)


def _load_dit_by_block(checkpoint, device, dtype, attention, each_block):
    """load_dit's ``each_block`` path: an empty (meta) model of dit/config.json, filled block by block
    (:func:`_fill_from_files`: host memory keeps no mapped pages of the files), ``each_block`` called
    on each; then the parts outside the blocks."""
    from accelerate import init_empty_weights

    folder = check_checkpoint(checkpoint, ["dit"])
    dtype = pick_dtype(dtype, device)

    def build():
        with init_empty_weights():
            model = LongCatVideoTransformer3DModel.from_config(
                LongCatVideoTransformer3DModel.load_config(folder / "dit"), cp_split_hw=None)
        weights = _weight_map(folder, "dit")
        _check_names("dit", set(model.state_dict()), weights)
        return model, weights

    model, weights = _load_or_explain("dit", folder, build)
    for i, block in enumerate(_loading(model.blocks, "dit blocks")):
        names = [n for n in weights if n.startswith(f"blocks.{i}.")]
        _load_or_explain("dit", folder, lambda: _fill_from_files(model, weights, names, device, dtype))
        each_block(block)
    rest = [n for n in weights if not n.startswith("blocks.")]
    _load_or_explain("dit", folder, lambda: _fill_from_files(model, weights, rest, device, dtype))
    if attention:
        model.set_attention_backend(attention)
    return model.eval().requires_grad_(False)


@dataclass
class Components:
    folder: Path
    tokenizer: Any = None
    text_encoder: Any = None
    vae: Any = None
    scheduler: Any = None
    dit: Any = None
    loras: dict = field(default_factory=dict)  # name -> path of official LoRA files in lora/
    memory: dict = field(default_factory=dict)  # how the DiT was placed (sample.load_sampling_components)
    # offload='model': the text encoder is not kept in memory; each encoding reads it from disk straight
    # onto the GPU in this dtype and frees it (sampling.pipeline.encode_text)
    text_encoder_on_demand: Any = None


def list_checkpoint_loras(folder: Path) -> dict:
    lora_dir = Path(folder) / "lora"
    if not lora_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(lora_dir.glob("*.safetensors"))}


def load_components(
    checkpoint: str | os.PathLike | None = "",
    parts: Iterable[str] = PARTS,
    device: str = "auto",
    dtypes: Optional[dict] = None,
    devices: Optional[dict] = None,
    attention: Optional[str] = None,
) -> Components:
    """Load the chosen parts of a checkpoint, each with its own dtype and device.

    ``dtypes``/``devices`` map part name -> value (e.g. ``{"text_encoder": "cpu"}`` to keep the
    5.7B encoder off the GPU); unspecified parts use ``device`` and 'auto' precision.
    """
    parts = list(parts)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; choose from {PARTS}")
    folder = check_checkpoint(checkpoint, parts)  # every missing file named at once, before any loads
    dtypes, devices = dtypes or {}, devices or {}
    base = pick_device(device)
    dev = lambda p: pick_device(devices.get(p, str(base)))  # noqa: E731
    c = Components(folder=folder, loras=list_checkpoint_loras(folder))
    if "tokenizer" in parts:
        c.tokenizer = load_tokenizer(folder)
    if "text_encoder" in parts:
        c.text_encoder = load_text_encoder(folder, dev("text_encoder"), dtypes.get("text_encoder", "auto"))
    if "vae" in parts:
        c.vae = load_vae(folder, dev("vae"), dtypes.get("vae", "auto"))
    if "scheduler" in parts:
        c.scheduler = load_scheduler(folder)
    if "dit" in parts:
        c.dit = load_dit(folder, dev("dit"), dtypes.get("dit", "auto"), attention)
    return c


def describe_checkpoint(checkpoint: str | os.PathLike | None = "") -> dict:
    """What is in the folder, without loading weights (for the setup notebook)."""
    folder = resolve_checkpoint(checkpoint)
    info: dict = {"folder": str(folder), "tiny": not checkpoint, "parts": {}}
    for part in PARTS:
        sub = folder / part
        files = [p for p in sub.rglob("*") if p.is_file()] if sub.is_dir() else []
        info["parts"][part] = {
            "present": sub.is_dir(),
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
            "missing": ", ".join(missing_files(folder, part)),
        }
    cfg = folder / "dit" / "config.json"
    if cfg.exists():
        dit_cfg = json.loads(cfg.read_text())
        info["dit_config"] = {k: dit_cfg.get(k) for k in ("hidden_size", "depth", "num_heads", "text_tokens_zero_pad", "enable_bsa")}
    info["loras"] = sorted(list_checkpoint_loras(folder))
    return info


# ---------------------------------------------------------------------------------------------
# the tiny default checkpoint
# ---------------------------------------------------------------------------------------------
TINY_DIT = dict(
    in_channels=16, out_channels=16, hidden_size=128, depth=2, num_heads=2, caption_channels=32,
    mlp_ratio=4, adaln_tembed_dim=64, frequency_embedding_size=64, patch_size=[1, 2, 2],
    enable_flashattn3=False, enable_flashattn2=True, enable_xformers=False, enable_bsa=False,
    bsa_params={"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
    cp_split_hw=None, text_tokens_zero_pad=True,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])
TINY_TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                 layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

_TOKENIZER_CORPUS = [
    "A red fox runs through a snowy forest at dawn, soft light, slow camera pan.",
    "A small boat drifts across a calm lake under a pink sunset sky.",
    "Close-up of raindrops falling on green leaves, shallow depth of field.",
    "The camera slowly zooms in on a city skyline at night with glowing windows.",
    "A cat jumps onto a wooden table and knocks over a cup of coffee.",
    "Waves crash against black rocks; white foam, cinematic, 4k, high quality.",
    "一只红色的狐狸在黎明时分穿过雪林，柔和的光线，镜头缓慢移动。",
    "夕阳下，一艘小船在平静的湖面上漂流，天空是粉红色的。",
    "城市夜景，摄像机缓缓推近，窗户里透出温暖的灯光。",
    "一只猫跳上木桌，打翻了一杯咖啡。",
    "海浪拍打着黑色的岩石，白色的泡沫，电影感，高清画质。",
]


def build_tiny_tokenizer(out_dir: Path):
    """A T5-style Unigram tokenizer written offline from a fixed English + Chinese word list.

    The vocabulary is made by hand, not trained (the trainer is multi-threaded and not
    reproducible): words of a small caption corpus, printable ASCII, common CJK characters, and the
    256 byte pieces, so every caption tokenizes with no <unk>, like the real UMT5 SentencePiece model.
    """
    import re

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = sorted({w for line in _TOKENIZER_CORPUS for w in re.findall(r"[A-Za-z]+|\d+", line)})
    words = sorted(set(words) | {w.lower() for w in words})
    vocab += [("\u2581" + w, -5.0 - 0.001 * len(w)) for w in words]  # "▁word": a word at a word start
    vocab += [(w, -7.0) for w in words]
    chars = [chr(c) for c in range(0x21, 0x7F)] + ["\u2581"]
    cjk = {chr(c) for c in range(0x4E00, 0x4E00 + 2500)} | {ch for line in _TOKENIZER_CORPUS for ch in line if ord(ch) > 0x2E80}
    seen = {p for p, _ in vocab}
    vocab += [(ch, -10.0) for ch in chars + sorted(cjk) if ch not in seen]
    vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    # Saved as a generic fast tokenizer: transformers' T5Tokenizer class would rebuild the model from
    # the vocabulary and drop the byte fallback.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.model_max_length = 512
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a complete checkpoint in the Hub layout with the real classes and tiny sizes.

    Deterministic from ``seed``; a few MB; seconds on CPU. Written to a temporary folder and
    renamed, so an interrupted build never leaves a half checkpoint behind.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite and (out_dir / "dit" / "config.json").exists():
            return out_dir
        if overwrite:
            shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer = build_tiny_tokenizer(tmp / "tokenizer")
        # Each component from its own seed, so changing one never changes the others.
        torch.manual_seed(seed)
        text_cfg = UMT5Config(vocab_size=len(tokenizer), **TINY_TEXT)
        UMT5EncoderModel(text_cfg).save_pretrained(tmp / "text_encoder")
        torch.manual_seed(seed + 1)
        AutoencoderKLWan(**TINY_VAE).save_pretrained(tmp / "vae")
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0).save_pretrained(tmp / "scheduler")
        torch.manual_seed(seed + 2)
        dit = LongCatVideoTransformer3DModel(**TINY_DIT)
        # Sharded like the Hub folder (index + several files) so the sharded path is what we test.
        dit.save_pretrained(tmp / "dit", max_shard_size="200KB", safe_serialization=True)
        (tmp / "lora").mkdir()
        (tmp / "README.md").write_text(
            "Tiny deterministic LongCat-Video checkpoint made by `python -m longcat_nb tiny-checkpoint` "
            f"(seed {seed}). Same layout and classes as {HUB_REPO}; random weights, for tests and demos.\n"
        )
        # mkdtemp's 0700 folder and safetensors' 0600 files -> what the umask gives a plain write
        set_plain_modes(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
