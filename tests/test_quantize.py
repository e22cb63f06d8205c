"""Weight-only int8 / int4 (gptneox/quant/): the schemes' error bounds, a quantized model against the same model
with the dequantized weights, generation and the KV cache, gradients for LoRA, streaming load, save / load bit for
bit, convert_weights.py and sample.py flags, and every bad input the issue names."""

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from scripts import run_script
from tiny import checkpoint_with_tokenizer, hf_model, save_checkpoint
from tolerances import FP32_LOGITS_REL, assert_rel_close, assert_within_2x

from gptneox import CheckpointError, Config, GPTNeoX, QuantizedLinear, quantize
from gptneox.loading import model_bytes
from gptneox.quant.cpu import cpu_kernels, own_cpu_kernels
from gptneox.quant.schemes import GROUP_SIZES, dequantize_weight, quantize_weight
from gptneox.quant.transform import targets, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = [("int8", 128), *(("int4", g) for g in GROUP_SIZES)]
IDS = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(1))


def tiny_model(**overrides) -> GPTNeoX:
    """Ours with a tiny random HF model's weights (C = 64: every int4 group size leaves a short last group)."""
    hf = hf_model(0, **overrides)
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict())).eval()
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf.state_dict().items()}
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    return model


def dequantized_twin(model) -> GPTNeoX:
    """The unquantized architecture holding each QuantizedLinear's dequantize(): the reference for its logits."""
    twin = GPTNeoX(model.config).eval()
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            state[f"{name}.weight"] = m.dequantize()
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] not in quantized:
            state[name] = t
    twin.load_state_dict(state, strict=True)
    return twin


# --------------------------------------------------------------------------------------------------- schemes
@pytest.mark.parametrize("K", [64, 96, 301])
@pytest.mark.parametrize("mode,group_size", SCHEMES)
def test_quantize_weight_round_trip_within_half_a_step(mode, group_size, K):
    w = torch.randn(37, K) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different sizes
    w[3] = 0.0  # an all-zero row: no division by a zero scale
    t = quantize_weight(w, mode, group_size)
    back = dequantize_weight(t["weight"], t["scales"], t.get("zeros"), K, mode, group_size)
    assert back.shape == w.shape and back.dtype == w.dtype
    if mode == "int8":
        assert t["weight"].dtype == torch.int8 and t["weight"].shape == (37, K)
        step = t["scales"][:, None].expand(-1, K)  # [N, K]
    else:
        G = -(-K // group_size)
        assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (37, (K + 1) // 2)
        assert t["scales"].shape == t["zeros"].shape == (37, G)
        step = t["scales"].repeat_interleave(group_size, dim=1)[:, :K]
    err = (back - w).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all(), f"max error / step {(err / step.clamp_min(1e-30)).max():.3f}"
    assert back[3].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_weight_keeps_the_float_dtype_of_scales(dtype):
    t = quantize_weight(torch.randn(16, 64).to(dtype), "int4", 32)
    assert t["scales"].dtype == t["zeros"].dtype == dtype


def test_cpu_operators_exist_and_agree_on_this_torch():
    """torch >= 2.6 has both packed CPU operators; a torch where one is missing or changed would silently run the
    dequantize fallback, so this states what the suite expects of the pinned torch. Likewise gptneox/quant/cpu_quant.c,
    which this machine's compiler builds: a failed build would silently fall back to the slower operators."""
    assert cpu_kernels() == {"int8", "int4"}
    assert own_cpu_kernels() == {"int8", "int4"}


# ----------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("tied", [False, True])
def test_quantize_replaces_every_block_linear_and_embed_out_not_embed_in(tied):
    model = quantize(tiny_model(tie_word_embeddings=tied), "int4", group_size=32)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert linears == (["embed_out"] if tied else [])  # a tied head is the embedding table: it stays float
    assert quantized == targets(model) and len(quantized) == 2 * 4 + (0 if tied else 1)  # 2 layers of 4 linears
    assert model.gpt_neox.embed_in.weight.dtype == torch.float32
    trainable = {n.rpartition(".")[0] for n, _ in model.named_parameters()}
    assert not trainable & set(quantized)  # nothing of a quantized layer is a parameter
    if tied:
        assert model.embed_out.weight is model.gpt_neox.embed_in.weight
    assert model.config == tiny_model(tie_word_embeddings=tied).config


@pytest.mark.parametrize("path", ["cpu_quant", "torch-operators", "dequantize-fallback"])
@pytest.mark.parametrize("mode,group_size", SCHEMES)
def test_quantized_logits_match_the_dequantized_model(mode, group_size, path, monkeypatch):
    module = importlib.import_module("gptneox.quant.cpu")  # which CPU kernel a QuantizedLinear runs
    if path != "cpu_quant":
        monkeypatch.setattr(module, "own_cpu_kernels", lambda: frozenset())
    if path == "dequantize-fallback":
        monkeypatch.setattr(module, "cpu_kernels", lambda: frozenset())
    model = quantize(tiny_model(), mode, group_size=group_size)
    with torch.no_grad():
        assert_rel_close(model(IDS), dequantized_twin(model)(IDS), FP32_LOGITS_REL, f"{mode} g{group_size}")


@pytest.mark.parametrize("mode,group_size", [("int8", 128), ("int4", 32)])
def test_quantized_model_cached_decode_matches_full_forward_and_generates_the_twins_tokens(mode, group_size):
    model = quantize(tiny_model(), mode, group_size=group_size)
    with torch.no_grad():
        full = model(IDS)
        cache = model.new_cache(2, 16)
        steps = [model(IDS[:, :5], cache=cache, input_pos=torch.arange(5))]
        steps += [model(IDS[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(5, 11)]
    assert cache[0].k_cache.dtype == torch.float32
    assert_rel_close(torch.cat(steps, 1), full, FP32_LOGITS_REL, "cached vs full")
    twin = dequantized_twin(model)
    a = model.generate(IDS[:1, :4], max_new_tokens=12, temperature=0)
    b = twin.generate(IDS[:1, :4], max_new_tokens=12, temperature=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linear_passes_gradients_to_its_input_only(mode):
    """QLoRA's base(x) + lora(x): dx flows through the frozen layer, for a non-contiguous 3-D x."""
    linear = nn.Linear(96, 40)
    q = QuantizedLinear.from_linear(linear, mode, 32)
    ref = nn.Linear(96, 40)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        ref.bias.copy_(q.bias)
    x = torch.randn(5, 3, 96).transpose(0, 1)  # [3, 5, 96], not contiguous
    dy = torch.randn(3, 5, 40)
    grads = []
    for layer in (q, ref):
        xi = x.detach().clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        grads.append((y, xi.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert list(q.parameters()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode,group_size", SCHEMES)
def test_quantized_model_on_cuda_bf16_within_2x_of_the_dequantized_model(mode, group_size):
    model = quantize(tiny_model().cuda().to(torch.bfloat16), mode, group_size=group_size)
    twin = dequantized_twin(model)
    ids = IDS.cuda()
    with torch.no_grad():
        ref = twin.float()(ids)
        base = twin.to(torch.bfloat16)(ids)
        assert_within_2x(model(ids), base, ref, f"{mode} g{group_size} bf16")


def test_weight_bytes_meet_the_targets_against_bf16_at_pythia_160m():
    config = Config.from_name("pythia-160m")
    bf16 = model_bytes(config, torch.bfloat16)
    embed = config.vocab_size * config.hidden_size * 2
    assert (model_bytes(config, torch.bfloat16, {"mode": "int8"}) - embed) / (bf16 - embed) <= 0.55
    assert (model_bytes(config, torch.bfloat16, {"mode": "int4", "group_size": 128}) - embed) / (bf16 - embed) <= 0.32
    with torch.device("meta"):
        m = quantize(GPTNeoX(config).to(torch.bfloat16), "int8")
    assert weight_bytes(m) == model_bytes(config, torch.bfloat16, {"mode": "int8"}) - embed


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(hf_model(0), tmp_path_factory.mktemp("float") / "tiny", "safetensors-sharded")


@pytest.mark.parametrize("mode,group_size", [("int8", 128), ("int4", 64)])
def test_from_pretrained_quantizes_while_streaming_as_quantize_does(ckpt, mode, group_size):
    streamed = GPTNeoX.from_pretrained(ckpt, quantize=mode, group_size=group_size)
    after = quantize(GPTNeoX.from_pretrained(ckpt), mode, group_size=group_size)
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,group_size", [("int8", 128), ("int4", 32)])
def test_save_pretrained_round_trips_bit_for_bit(ckpt, tmp_path, mode, group_size, dtype):
    model = GPTNeoX.from_pretrained(ckpt, dtype=dtype, quantize=mode, group_size=group_size)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == ({"mode": "int8"} if mode == "int8" else {"mode": mode, "group_size": group_size})
    assert config["torch_dtype"] == str(dtype)[6:]
    back = GPTNeoX.from_pretrained(tmp_path / "q")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    with torch.no_grad():
        assert torch.equal(model(IDS), back(IDS))


def test_convert_weights_quantize_writes_what_from_pretrained_quantizes(ckpt, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), str(ckpt), str(tmp_path / "q"),
                        "--quantize", "int4", "--group-size", "32", "--verify", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "verified_tensors" in r.stdout
    out, ref = GPTNeoX.from_pretrained(tmp_path / "q"), GPTNeoX.from_pretrained(ckpt, quantize="int4", group_size=32)
    for name, t in ref.state_dict().items():
        assert torch.equal(out.state_dict()[name], t), name


@pytest.mark.parametrize("args,message", [
    (["--group-size", "32"], "--group-size is the int4 group size"),
    (["--quantize", "int4", "--group-size", "48"], "invalid choice"),
    (["--quantize", "int8", "--to", "neox"], "--quantize: only with --to hf"),
])
def test_convert_weights_refuses_bad_quantize_flags_with_exit_2(ckpt, tmp_path, capsys, args, message):
    status, _, err = run_script(capsys, "convert_weights.py", ckpt, tmp_path / "q", *args)
    assert status == 2 and message in err, err
    assert not (tmp_path / "q").exists()


def sample_cli(capsys, *argv) -> tuple[str, str]:
    """sample.py's greedy stdout and stderr, run in this process (its end-to-end runs are tests/test_sample.py's)."""
    status, out, err = run_script(capsys, "sample.py", *argv, "--temperature", "0", "--max-new-tokens", "5",
                                  "--device", "cpu", "--no-progress")
    assert status == 0, err
    return out, err


def test_sample_quantize_reports_mode_and_weight_memory(tmp_path, capsys):
    shared = ROOT.parent / "shared" / "data" / "pythia-tokenizer.json"
    if not shared.is_file():
        pytest.skip(f"shared test data not found at {shared}")
    path = save_checkpoint(hf_model(1, vocab_size=50304, max_position_embeddings=256), tmp_path / "p", "safetensors")
    (path / "tokenizer.json").write_bytes(shared.read_bytes())
    out, err = sample_cli(capsys, "--ckpt", path, "--prompt", "Hello", "--quantize", "int4", "--group-size", "32")
    assert "weights int4 g32:" in err
    assert "weights float32:" in sample_cli(capsys, "--ckpt", path, "--prompt", "Hello")[1]
    quantized = GPTNeoX.from_pretrained(path, quantize="int4", group_size=32)
    quantized.save_pretrained(tmp_path / "q", tokenizer=None)
    (tmp_path / "q" / "tokenizer.json").write_bytes(shared.read_bytes())
    saved_out, saved_err = sample_cli(capsys, "--ckpt", tmp_path / "q", "--prompt", "Hello")
    assert "weights int4 g32:" in saved_err
    assert saved_out == out  # the saved directory generates what quantizing on load does


@pytest.mark.slow  # a minute on 2 cores (Inductor); tests/kernels/test_custom_ops.py covers the compiled Generator
def test_sample_compile_with_quantized_weights_generates_what_eager_does(tmp_path):
    """sample.py --quantize int8 --compile: the compiled decode step keeps the weight-only matmul (the
    gptneox::quant_matmul op) and prints the eager run's text."""
    shared = ROOT.parent / "shared" / "data" / "pythia-tokenizer.json"
    if not shared.is_file():
        pytest.skip(f"shared test data not found at {shared}")
    path = checkpoint_with_tokenizer(tmp_path / "p", shared, 1, vocab_size=50304, max_position_embeddings=64)
    out = {}
    for flags in (["--compile"], []):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(path), "--prompt", "Hello",
                            "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu", "--quantize", "int8",
                            *flags], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "weights int8:" in r.stderr, r.stderr
        out[bool(flags)] = r.stdout
        report = r.stderr.strip().splitlines()[-1]
        if flags:  # said before the wait, and timed apart from the tokens/s
            assert "compiling the decode step (first call only) ..." in r.stderr
            assert re.search(r"\| compile \d+\.\d s \(first call only\) \| 6 tokens in", report), report
        else:
            assert "compil" not in r.stderr
    assert out[True] == out[False] and out[True].strip()


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_settings_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'; choose one of int8, int4"):
        quantize(tiny_model(), "int3")
    with pytest.raises(ValueError, match="group_size 48 is not supported; choose one of 32, 64, 128, 256"):
        quantize(tiny_model(), "int4", group_size=48)


def test_quantizing_twice_is_refused():
    model = quantize(tiny_model(), "int8")
    with pytest.raises(ValueError, match=r"already quantized \({'mode': 'int8'}\)"):
        quantize(model, "int4")


def test_training_frozen_weights_is_refused_with_a_pointer_to_lora():
    model = quantize(tiny_model(), "int4", group_size=32)
    with pytest.raises(ValueError, match="LoRA"):
        model.embed_out.requires_grad_(True)
    model.embed_out.requires_grad_(False)  # freezing what is frozen is fine


def test_quantized_directory_refuses_another_quantization(ckpt, tmp_path):
    GPTNeoX.from_pretrained(ckpt, quantize="int8").save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match=r"already quantized \(int8\); it cannot be requantized to int4 g128"):
        GPTNeoX.from_pretrained(tmp_path / "q", quantize="int4")
    GPTNeoX.from_pretrained(tmp_path / "q", quantize="int8")  # the same settings: fine


@pytest.mark.parametrize("edit,message", [
    ({"mode": "int8"}, r"model.safetensors: tensor 'embed_out.scales' has shape \[101, 1\], but config.json with "
                       r"quantization \{'mode': 'int8'\} implies \[101\]"),
    ({"mode": "int4", "group_size": 32}, r"tensor 'embed_out.scales' has shape \[101, 1\], but config.json with "
                                         r"quantization \{'mode': 'int4', 'group_size': 32\} implies \[101, 2\]"),
    ({"mode": "int5"}, r"config.json: field 'quantization' is \{'mode': 'int5'\}: unknown quantization mode"),
    (None, r"unexpected tensor 'embed_out.scales', .* quantization=None"),
])
def test_config_and_tensors_that_disagree_are_refused_naming_both(ckpt, tmp_path, edit, message):
    GPTNeoX.from_pretrained(ckpt, quantize="int4", group_size=64).save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization"] = edit
    if edit is None:
        del config["quantization"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        GPTNeoX.from_pretrained(tmp_path / "q")


def test_convert_weights_refuses_a_quantized_source(ckpt, tmp_path, capsys):
    GPTNeoX.from_pretrained(ckpt, quantize="int8").save_pretrained(tmp_path / "q")
    status, _, err = run_script(capsys, "convert_weights.py", tmp_path / "q", tmp_path / "out")
    assert status == 1 and "is a quantized checkpoint" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--group-size", "64"], "--group-size is the int4 group size: give it with --quantize int4"),
    (["--quantize", "int8", "--group-size", "64"], "--group-size: only with --quantize int4"),
    (["--quantize", "int5"], "invalid choice: 'int5'"),
])
def test_sample_refuses_contradicting_quantize_flags_with_exit_2(ckpt, capsys, flags, message):
    status, _, err = run_script(capsys, "sample.py", "--ckpt", ckpt, "--prompt", "x", *flags)
    assert status == 2 and message in err, err


def test_train_refuses_a_quantized_checkpoint_with_a_pointer_to_lora(ckpt, tmp_path, capsys):
    GPTNeoX.from_pretrained(ckpt, quantize="int4", group_size=32).save_pretrained(tmp_path / "q")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "a", "context": "", "response": "b", "category": "x"}) + "\n")
    status, _, err = run_script(capsys, "train.py", "--init", tmp_path / "q", "--data", data, "--out",
                                tmp_path / "out", "--max-steps", "1", "--no-progress")
    assert status == 1, err
    assert "a quantized checkpoint ({'mode': 'int4', 'group_size': 32})" in err and "LoRA" in err
    assert not (tmp_path / "out").exists()


def test_saved_config_warns_transformers_off_an_unknown_quantization(ckpt, tmp_path):
    GPTNeoX.from_pretrained(ckpt, quantize="int8").save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"mode": "int8"}
    assert config["quantization_config"]["quant_method"] == "gptneox"  # not a method transformers knows


def test_a_float_checkpoint_whose_config_claims_quantization_is_refused(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    (tmp_path / "f" / "config.json").write_text(json.dumps({**config, "quantization": {"mode": "int8"}}))
    with pytest.raises(CheckpointError, match=r"tensor '.*' is float32 \[\d+, \d+\], but config.json with quantization "
                                              r"\{'mode': 'int8'\} implies int8 \[\d+, \d+\]"):
        GPTNeoX.from_pretrained(tmp_path / "f")
