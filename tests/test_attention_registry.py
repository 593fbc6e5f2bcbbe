"""Attention backends as registered objects (models/attention/): a backend defined here, in the test only,
runs the tiny DiT; the registry's names are config.py's choices; options replace the module globals."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from test_dit import inputs, tiny_model

from longcat_nb.models import attention as A


def _math_attention(q, k, v, attn_mask=None):
    """Plain softmax(q kᵀ / sqrt(D)) v, the attention a reader can check by hand."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask.bool(), float("-inf"))
    return s.softmax(-1) @ v


@pytest.fixture
def toy():
    """A 'math' backend, self- and cross-attention, registered for one test only."""
    calls = {"self": 0, "cross": 0}

    def self_attn(q, k, v, grid_q, grid_k, params=None):
        calls["self"] += 1
        return _math_attention(q, k, v)

    def cross_attn(q, k, v, attn_mask=None):
        calls["cross"] += 1
        return _math_attention(q, k, v, attn_mask)

    backend = A.register(A.AttentionBackend(name="math", description="plain torch math", self_attention=self_attn,
                                            cross_attention=cross_attn, kept_ops=("aten::_softmax",)))
    try:
        yield backend, calls
    finally:
        A.unregister("math")


def test_a_backend_registered_in_a_test_runs_the_dit(toy):
    backend, calls = toy
    x, y, mask = inputs()
    t = torch.tensor([500.0, 500.0])
    m = tiny_model()
    with torch.no_grad():
        dense = m(x, t, y, mask)
        assert m.set_attention_backend("math") == "math" and m.attention_backend == "math"
        assert m.blocks[1].attn.attention is backend and m.blocks[1].cross_attn.backend == "math"
        out = m(x, t, y, mask)
    assert calls == {"self": 2, "cross": 2}  # two blocks, each one call of each
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    # selective checkpointing keeps what the registered backends name
    from longcat_nb.memory import _ATTENTION_OPS

    assert torch.ops.aten._softmax.default in _ATTENTION_OPS
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in _ATTENTION_OPS
    assert torch.ops.aten.mm.default not in _ATTENTION_OPS


def test_unavailable_backend_selects_sdpa_or_falls_back_per_call(toy):
    backend, calls = toy
    m = tiny_model()
    backend.unavailable = lambda: "needs a machine we do not have"
    assert m.set_attention_backend("math") == "sdpa" and m.blocks[0].attn.backend == "sdpa"
    backend.falls_back_per_call = True  # its functions pick dense attention themselves
    assert m.set_attention_backend(backend) == "math"
    assert copy.deepcopy(m).blocks[0].attn.attention is backend  # one object per process, options shared


def test_registry_holds_exactly_configs_choices_and_resolves_auto():
    from longcat_nb.config import field_choices

    assert A.names() == field_choices("model")["attention"] == A.BACKENDS
    auto = A.get("auto")
    assert auto.for_grid((2, 45, 80)) is A.get("bsa")  # 720x1280: 3,600 tokens a frame
    assert auto.for_grid((2, 30, 52)) is A.get("sdpa")  # 480x832, a training step (gradients on)
    with torch.no_grad():  # sampling and validation: 8-bit dense attention below the block-sparse line
        assert auto.for_grid((2, 30, 52)) is A.get("quant8")
        assert auto.for_grid((2, 45, 80)) is A.get("bsa")
        q, k, v = torch.randn(3, 1, 2, 2 * 3 * 4, 8).unbind(0)  # where quant8 cannot run (the CPU): SDPA
        assert torch.equal(auto.self_attention(q, k, v, (2, 3, 4), (2, 3, 4)), A.get("sdpa").self_attention(q, k, v, (2, 3, 4), (2, 3, 4)))
    assert A.get("flash_attention_2") is A.get("sdpa")  # the checkpoint's flag names
    with pytest.raises(ValueError, match="attention_implementation='int4' is not one of .*quant8"):
        A.get("int4")
    report = A.availability("bsa")
    assert [r["backend"] for r in report["backends"]] == list(A.BACKENDS)
    rows = {r["backend"]: r for r in report["backends"]}
    assert rows["sdpa"]["available"] == "yes"
    if not torch.cuda.is_available():
        assert rows["bsa"]["reason"] == "needs CUDA and Triton"
        assert report["summary"].endswith("will run: bsa where it can, dense SDPA here (needs CUDA and Triton)")


def test_sdpa_preference_and_quant8_training_are_backend_options(monkeypatch):
    from longcat_nb.speed import set_sdpa_preference

    sdpa, quant8 = A.get("sdpa"), A.get("quant8")
    before = set_sdpa_preference("math")
    try:
        assert sdpa.option("preference") == "math" and A.sdpa_preference() == "math"
        with pytest.raises(ValueError, match="preference='fast': choose one of .*'cudnn'"):
            set_sdpa_preference("fast")
    finally:
        set_sdpa_preference(before)
    previous = quant8.option("training")
    with A.quant8_training("cudnn"):
        assert quant8.option("training") == "cudnn"
    assert quant8.option("training") == previous
    # the environment variables set the starting values, checked when read
    monkeypatch.setenv("LONGCAT_NB_QUANT8_TRAINING", "fast")
    with pytest.raises(ValueError, match="LONGCAT_NB_QUANT8_TRAINING='fast': choose one of"):
        A.Option("auto", A.QUANT8_TRAINING, env="LONGCAT_NB_QUANT8_TRAINING")


def test_environment_variables_set_the_options(repo_root):
    code = ("from longcat_nb.models import attention as A; "
            "print(A.sdpa_preference(), A.get('quant8').option('training'))")
    env = dict(os.environ, LONGCAT_NB_SDPA="flash", LONGCAT_NB_QUANT8_TRAINING="cudnn", PYTHONPATH=str(repo_root))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=repo_root)
    assert p.stdout.split() == ["flash", "cudnn"], p.stderr[-2000:]
