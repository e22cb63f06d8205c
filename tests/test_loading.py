"""gptneox.load: the one loader, its fixed order, one copy of every rule, and the entry points that use it."""

import os

import pytest
import torch
from scripts import run_script
from tiny import checkpoint_with_tokenizer
from tolerances import FP32_LOGITS_REL, assert_rel_close

import gptneox
from gptneox import GPTNeoX, LoRAConfig, QuantizedLinear, Tokenizer, add_lora, quantize, save_adapter
from gptneox import loading
from gptneox.loading import LoadError, LoadPlan, plan


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, shared_data):
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("load") / "tiny", os.path.join(shared_data,
                                     "pythia-tokenizer.json"), vocab_size=50304)


@pytest.fixture(scope="module")
def adapter(ckpt, tmp_path_factory, shared_data):
    """An adapter trained with Dolly's tokenizer (so it carries its own tokenizer.json) on a random base."""
    model = GPTNeoX.from_pretrained(ckpt, dtype=torch.float32)
    add_lora(model, LoRAConfig(r=2, alpha=4, targets=("value",)))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    save_adapter(model, folder, tokenizer=Tokenizer.from_pretrained(os.path.join(shared_data,
                                                                                  "dolly-tokenizer.json")))
    return folder


@pytest.mark.parametrize("dtype, want", [("auto", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16),
                                         (torch.float32, torch.float32), (None, torch.float32)])
def test_load_takes_the_scripts_dtype_spellings(ckpt, dtype, want):
    model, tok = gptneox.load(ckpt, dtype=dtype, device="cpu")
    assert model.gpt_neox.embed_in.weight.dtype == want and not model.training
    assert isinstance(tok, Tokenizer) and tok.vocab_size > 50000


def test_load_equals_from_pretrained(ckpt):
    model, _ = gptneox.load(str(ckpt), dtype="fp32")
    ref = GPTNeoX.from_pretrained(ckpt, dtype=torch.float32)
    ids = torch.randint(0, 50000, (2, 9))
    with torch.no_grad():
        assert_rel_close(model(ids), ref(ids), FP32_LOGITS_REL, "logits")


def test_load_quantizes_then_attaches_the_adapter_and_picks_its_tokenizer(ckpt, adapter, shared_data):
    model, tok = gptneox.load(ckpt, quantize="int4", group_size=32, adapter=adapter, dtype="fp32")
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())  # QLoRA's order: adapter on the quantized base
    assert tok.is_dolly  # the adapter's own tokenizer.json wins over the checkpoint's
    want = GPTNeoX.from_pretrained(ckpt, dtype=torch.float32, quantize="int4", group_size=32, adapter=adapter)
    ids = torch.randint(0, 50000, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), want(ids))
    _, explicit = gptneox.load(ckpt, adapter=adapter, tokenizer=os.path.join(shared_data, "pythia-tokenizer.json"))
    assert not explicit.is_dolly  # a tokenizer given wins over the adapter's


def test_plan_checks_everything_before_any_weight_is_read(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: pytest.fail("weights read by plan()"))
    p = plan(ckpt, quantize="int8", dtype="bf16")
    assert isinstance(p, LoadPlan) and p.quantization == {"mode": "int8"} and p.dtype == torch.bfloat16
    cases = [(dict(adapter=tmp_path), f"adapter='{tmp_path}': no adapter_config.json there"),
             (dict(quantize="int3"), "unknown quantization mode 'int3'"),
             (dict(quantize="int4", group_size=48), "int4 group_size 48 is not supported"),
             (dict(dtype="half"), "dtype='half': not a dtype"),
             (dict(device="cuda:7" if not torch.cuda.is_available() else "tpu"), "device=")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            plan(ckpt, **kwargs)
    with pytest.raises(LoadError, match=r"--adapter .*: no adapter_config.json"):  # a script's names
        plan(ckpt, adapter=tmp_path, names={"adapter": "--adapter"})
    with pytest.raises(ValueError, match="no-such-model"):
        plan(tmp_path / "no-such-model")


def test_a_quantized_checkpoint_loads_quantized_and_refuses_other_settings(ckpt, tmp_path):
    quantize(GPTNeoX.from_pretrained(ckpt), "int8").save_pretrained(tmp_path / "q8")
    model, _ = gptneox.load(tmp_path / "q8", tokenizer=ckpt)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert plan(tmp_path / "q8", quantize="int8", tokenizer=ckpt).quantization == {"mode": "int8"}
    with pytest.raises(LoadError, match="already quantized"):
        plan(tmp_path / "q8", quantize="int4", tokenizer=ckpt)


def test_a_plan_loads_with_nothing_else_given(ckpt):
    model, tok = gptneox.load(plan(ckpt, dtype="fp32"))
    assert isinstance(model, GPTNeoX) and isinstance(tok, Tokenizer)


def test_every_entry_point_loads_through_gptneox_load(ckpt, capsys, monkeypatch, tmp_path):
    """sample.py, the server's loader, lm-eval's model and train.py --init: each model comes from loading.load."""
    calls = []
    real = loading.load_pretrained
    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    status, out, err = run_script(capsys, "sample.py", "--ckpt", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "2",
                                  "--device", "cpu")
    assert status == 0 and len(calls) == 1
    from gptneox.serve.server import load as serve_load
    serve_load(plan(ckpt, dtype="fp32"))
    assert len(calls) == 2
    from gptneox.eval import GPTNeoXLM
    GPTNeoXLM(pretrained=str(ckpt), device="cpu", dtype="float32")
    assert len(calls) == 3
    from gptneox.train import loop
    loop.load_model(loop.TrainConfig(data="x.jsonl", out=str(tmp_path / "run"), init=str(ckpt)))
    assert len(calls) == 4
