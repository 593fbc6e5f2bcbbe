"""The checkpoint layout: tiny default built with the real classes, loaded through the real code."""
import json
import shutil

import pytest
import torch

from longcat_nb.model_files import (
    CheckpointError, build_tiny_checkpoint, describe_checkpoint, load_components, load_dit,
)
from longcat_nb.text import clean_prompt, encode_prompts
from longcat_nb.vae import check_num_frames, check_size, decode_latents, encode_video


def test_tiny_checkpoint_layout_and_official_classes(tiny_ckpt):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, UMT5EncoderModel

    for part in ("dit", "vae", "text_encoder", "tokenizer", "scheduler", "lora"):
        assert (tiny_ckpt / part).is_dir()
    assert (tiny_ckpt / "dit" / "diffusion_pytorch_model.safetensors.index.json").exists()
    cfg = json.loads((tiny_ckpt / "dit" / "config.json").read_text())
    assert cfg["_class_name"] == "LongCatVideoTransformer3DModel" and cfg["text_tokens_zero_pad"] is True
    # the library classes load every part on their own
    AutoencoderKLWan.from_pretrained(tiny_ckpt, subfolder="vae")
    UMT5EncoderModel.from_pretrained(tiny_ckpt, subfolder="text_encoder")
    AutoTokenizer.from_pretrained(tiny_ckpt, subfolder="tokenizer")
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_ckpt, subfolder="scheduler")
    assert sched.config.shift == 12.0
    size = sum(p.stat().st_size for p in tiny_ckpt.rglob("*") if p.is_file())
    assert size < 10 * 2**20


def test_tiny_checkpoint_is_deterministic(tmp_path, tiny_ckpt):
    other = build_tiny_checkpoint(tmp_path / "again", seed=0)
    a = load_dit(tiny_ckpt).state_dict()
    b = load_dit(other).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_ckpt / "tokenizer" / "tokenizer.json").read_bytes() == (other / "tokenizer" / "tokenizer.json").read_bytes()


def test_components_round_trip_and_encode(tiny_ckpt):
    c = load_components(tiny_ckpt, device="cpu", dtypes={"dit": "bfloat16"})
    assert c.dit.dtype == torch.bfloat16 and c.vae.dtype == torch.float32
    emb, mask = encode_prompts(c.tokenizer, c.text_encoder, ["A red fox 在雪地里奔跑", ""])
    assert emb.shape == (2, 1, 512, c.text_encoder.config.d_model) and mask.shape == (2, 512)
    assert mask[1].sum() == 1  # the empty negative prompt is one EOS token
    ids = c.tokenizer("狐狸 ☃ zebra").input_ids
    assert c.tokenizer.unk_token_id not in ids  # byte fallback: nothing is unknown
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    z = encode_video(c.vae, video, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 16, 3, 4, 6)
    out = c.dit(z, torch.tensor([500.0]), emb[:1], mask[:1])
    assert out.shape == z.shape and out.dtype == torch.float32
    assert decode_latents(c.vae, z).shape == video.shape


def test_missing_or_broken_parts_name_the_folder(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_components(tmp_path / "nowhere")
    broken = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=r"vae/.*hf download"):
        load_components(broken, parts=["vae"])
    shard = sorted((broken / "dit").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated download
    with pytest.raises(CheckpointError, match="dit"):
        load_components(broken, parts=["dit"])


def test_describe_checkpoint(tiny_ckpt):
    info = describe_checkpoint(str(tiny_ckpt))
    assert info["parts"]["dit"]["present"] and info["dit_config"]["depth"] == 2


def test_prompt_cleaning_and_rules():
    assert clean_prompt("  a &amp;amp; b\n\n c  ") == "a & b c"
    assert check_num_frames(93) == 93
    with pytest.raises(ValueError, match="93 or 97|89 or 93"):
        check_num_frames(95)
    with pytest.raises(ValueError, match="divisible by 16"):
        check_size(480, 830)


def test_load_dit_block_by_block_gives_the_same_weights_and_quantizes_as_it_loads(tmp_path, tiny_ckpt):
    """``each_block`` (a quantized base on a small card): each block is handed over once its weights are
    in, in order, and the model equals from_pretrained's; a block quantized there is left as it is by
    apply_base_precision, and the DiT computes what load-then-quantize gives."""
    from longcat_nb.memory import apply_base_precision, quantize_block

    ref = load_dit(tiny_ckpt)
    seen = []
    got = load_dit(tiny_ckpt, "cpu", "float32", each_block=lambda b: seen.append(
        (b, all(not p.is_meta for p in b.parameters()))))
    assert [b for b, _ in seen] == list(got.blocks) and all(ok for _, ok in seen)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not got.training and not any(p.requires_grad for p in got.parameters())
    assert load_dit(tiny_ckpt, "cpu", "bfloat16", each_block=lambda b: None).x_embedder.proj.weight.dtype == torch.bfloat16

    pytest.importorskip("optimum.quanto")
    streamed = load_dit(tiny_ckpt, "cpu", "float32", each_block=lambda b: quantize_block(b, "int8", "cpu"))
    weights = {id(p) for p in streamed.parameters()}
    apply_base_precision(streamed, "int8", "cpu")  # the order prepare_for_training runs: nothing re-quantized
    assert {id(p) for p in streamed.parameters()} == weights
    plain = apply_base_precision(load_dit(tiny_ckpt), "int8", "cpu")
    x, t = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    y, m = torch.randn(1, 1, 512, 32), torch.ones(1, 512, dtype=torch.long)
    assert torch.equal(streamed(x, t, y, m), plain(x, t, y, m))

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    index = broken / "dit" / "diffusion_pytorch_model.safetensors.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"].pop(next(k for k in meta["weight_map"] if k.startswith("blocks.1.")))
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"dit.*missing \['blocks\.1\."):
        load_dit(broken, "cpu", each_block=lambda b: None)


def _mapped(folder) -> list:
    """Lines of /proc/self/maps that map a file under ``folder``."""
    return [line for line in open("/proc/self/maps") if str(folder) in line]


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_host_copies_keep_no_file_mapped(tmp_path, tiny_ckpt, monkeypatch):
    """What block swap packs into pinned memory, and the text encoder a small card reads onto the GPU
    for each prompt, must not also keep the files' pages mapped: those count in host RAM (run 27: a
    16 GiB card's sampling peaked at 35.8 GiB). Read block by block (tensors over the chunk size in
    slices), the weights are from_pretrained's and no file stays mapped; from_pretrained's CPU load
    keeps them mapped."""
    import gc

    import longcat_nb.model_files as mf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    ref = load_dit(ckpt)
    assert _mapped(ckpt)  # from_pretrained's tensors are views of the files
    ref_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    del ref
    gc.collect()
    monkeypatch.setattr(mf, "_READ_CHUNK", 1000)  # every matrix of the tiny model read in slices
    got = load_dit(ckpt, "cpu", "float32", each_block=lambda b: None)
    enc = mf._load_text_encoder_by_layer(ckpt, "cpu", torch.bfloat16)
    gc.collect()
    assert not _mapped(ckpt)
    assert all(torch.equal(ref_sd[k], v) for k, v in got.state_dict().items())
    assert enc.shared.weight is enc.encoder.embed_tokens.weight  # one token table, as the files hold one


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_rss_peaks_tell_own_memory_from_mapped_file_pages(tmp_path):
    """Each stage's record splits its host peak: memory of its own (RssAnon) and mapped file pages
    (RssFile), which VmHWM adds together. A 256 MiB buffer filled and freed inside the block, and a
    256 MiB file mapped and read, each show in their own peak after they are gone."""
    import mmap
    import time

    from longcat_nb.envinfo import RssPeaks, proc_status_gib

    blob = tmp_path / "blob"
    blob.write_bytes(b"\1" * (256 << 20))
    anon0, file0 = proc_status_gib("RssAnon"), proc_status_gib("RssFile")
    with RssPeaks(every=0.01) as rss:
        buf = torch.ones(256 << 20, dtype=torch.uint8)
        time.sleep(0.2)
        del buf
        with open(blob, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert sum(m[i] for i in range(0, len(m), 4096)) == (256 << 20) // 4096
            time.sleep(0.2)
    got = rss.gib()
    assert got["host_anon_peak_gib"] >= anon0 + 0.2 and got["host_file_peak_gib"] >= file0 + 0.2


def test_text_encoder_read_layer_by_layer_is_from_pretrained(tmp_path, tiny_ckpt):
    """The accelerator's text encoder loader gives from_pretrained's model: values, dtypes (float16 keeps
    the feed-forward outputs in float32, as UMT5 asks), the tied token table, and its output; files
    that hold an embedding of the encoder's own keep it apart, as from_pretrained does."""
    from safetensors.torch import load_file, save_file
    from transformers import UMT5EncoderModel

    from longcat_nb.model_files import _load_text_encoder_by_layer, load_text_encoder

    for dtype in (torch.bfloat16, torch.float16):
        ref, got = load_text_encoder(tiny_ckpt, "cpu", dtype), _load_text_encoder_by_layer(tiny_ckpt, "cpu", dtype)
        a, b = ref.state_dict(), got.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert any(v.dtype == torch.float32 for k, v in b.items() if ".wo." in k) == (dtype == torch.float16)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref(input_ids=ids).last_hidden_state, got(input_ids=ids).last_hidden_state)

    two = tmp_path / "two"
    shutil.copytree(tiny_ckpt, two)
    weights = two / "text_encoder" / "model.safetensors"
    sd = load_file(weights)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"] * 2
    save_file(sd, weights, metadata={"format": "pt"})
    ref = UMT5EncoderModel.from_pretrained(two, subfolder="text_encoder", dtype=torch.float32)
    got = _load_text_encoder_by_layer(two, "cpu", torch.float32)
    assert got.shared.weight is not got.encoder.embed_tokens.weight
    a, b = ref.state_dict(), got.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_load_dit_block_by_block_onto_the_gpu(tiny_ckpt):
    """The each_block path reads each tensor straight onto the GPU: same weights as from_pretrained's
    device_map load (the text encoder's too, read layer by layer), and an int8 base quantized there
    computes what load-then-quantize does."""
    from longcat_nb.memory import apply_base_precision, quantize_block

    ref = load_dit(tiny_ckpt, "cuda", "bfloat16")
    got = load_dit(tiny_ckpt, "cuda", "bfloat16", each_block=lambda b: None)
    a, b = ref.state_dict(), got.state_dict()
    assert all(b[k].is_cuda and b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]) for k in a)
    from longcat_nb.model_files import load_text_encoder  # layer by layer onto the GPU
    a = load_text_encoder(tiny_ckpt, "cpu", "bfloat16").state_dict()
    b = load_text_encoder(tiny_ckpt, "cuda", "bfloat16").state_dict()
    assert a.keys() == b.keys() and all(b[k].is_cuda and torch.equal(a[k], b[k].cpu()) for k in a)
    pytest.importorskip("optimum.quanto")
    q = load_dit(tiny_ckpt, "cuda", "bfloat16", each_block=lambda blk: quantize_block(blk, "int8", "cuda"))
    plain = apply_base_precision(load_dit(tiny_ckpt, "cpu", "bfloat16"), "int8", "cuda")
    apply_base_precision(q, "int8", "cuda")
    x, t = torch.randn(1, 16, 2, 4, 6, device="cuda", dtype=torch.bfloat16), torch.tensor([500.0], device="cuda")
    y, m = torch.randn(1, 1, 512, 32, device="cuda", dtype=torch.bfloat16), torch.ones(1, 512, dtype=torch.long, device="cuda")
    with torch.no_grad():
        assert torch.equal(q(x, t, y, m), plain(x, t, y, m))


def test_layer_by_layer_loads_show_their_progress(tiny_ckpt, capsys):
    """A small card's DiT is read block by block (from_pretrained's shard bar does not show then), and
    its text encoder layer by layer: each says how far it is, so a minute of disk reads is no hang."""
    import longcat_nb.model_files as mf

    dit = load_dit(tiny_ckpt, "cpu", "float32", each_block=lambda b: None)
    enc = mf._load_text_encoder_by_layer(tiny_ckpt, "cpu", torch.bfloat16)
    err = capsys.readouterr().err
    n, m = len(dit.blocks), len(enc.encoder.block)
    assert "loading dit blocks:" in err and f"0/{n} " in err  # the bar, with its total
    assert "loading text encoder layers:" in err and f"0/{m} " in err
