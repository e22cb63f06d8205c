"""The whole model with backend="triton" against Hugging Face GPTNeoX (logits, loss, gradients, cache, padding),
and the wiring in gptneox/ops/: backend choice, masks, errors, loading the kernels from an uninstalled checkout."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cases import DEVICE, dense_mask
from tiny import hf_model, hf_state_dict
from tolerances import FP32_LOGITS_REL, FP32_LOSS_ABS, assert_grads_match_hf, assert_rel_close, assert_within_2x

from gptneox import Config, GPTNeoX, causal_lm_loss, ops

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [  # (use_parallel_residual, rotary_pct, head size, heads, batch)
    (True, 0.25, 32, 2, 1),
    (False, 1.0, 64, 1, 3),  # full rotary, sequential residual
    (True, 0.25, 80, 2, 3),  # pythia-2.8b / dolly-v2-3b head size
    (True, 0.25, 256, 1, 1),  # pythia-1b head size
]


def ours_from(hf, backend="triton", dtype=torch.float32) -> GPTNeoX:
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict()), backend=backend)
    model.load_state_dict(hf_state_dict(hf), strict=True)
    return model.to(device=DEVICE, dtype=dtype).eval()


def hf_on_device(**kw):
    return hf_model(**kw).to(DEVICE)


@pytest.mark.parametrize("parallel,pct,hs,nh,B", SHAPES)
def test_triton_backend_matches_hf_logits_fp32(parallel, pct, hs, nh, B):
    hf = hf_on_device(use_parallel_residual=parallel, rotary_pct=pct, hidden_size=hs * nh, num_attention_heads=nh,
                      intermediate_size=2 * hs * nh)
    x = torch.randint(0, hf.config.vocab_size, (B, 15), device=DEVICE)
    with torch.no_grad():
        assert_rel_close(ours_from(hf)(x), hf(x).logits, FP32_LOGITS_REL, f"triton logits hs={hs}")


def test_triton_backend_loss_and_gradients_match_hf():
    hf = hf_on_device(num_hidden_layers=2, hidden_size=160, num_attention_heads=2, intermediate_size=320).train()
    ours = ours_from(hf).train()
    x = torch.randint(0, hf.config.vocab_size, (2, 21), device=DEVICE)
    labels = x.clone()
    labels[0, :5] = -100
    hf_loss = hf(x, labels=labels).loss
    loss = causal_lm_loss(ours(x), labels)
    assert abs(loss.item() - hf_loss.item()) <= FP32_LOSS_ABS, (loss.item(), hf_loss.item())
    hf_loss.backward()
    loss.backward()
    assert_grads_match_hf(ours, hf)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=[
    pytest.mark.gpu, pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels need CUDA")])], ids=str)
def test_triton_backend_half_precision_within_2x_of_hf(dtype):
    hf32 = hf_on_device(num_hidden_layers=2, hidden_size=160, num_attention_heads=2, intermediate_size=320)
    x = torch.randint(0, hf32.config.vocab_size, (2, 17), device=DEVICE)
    with torch.no_grad():
        ref = hf32(x).logits
        hf_half = hf_on_device(num_hidden_layers=2, hidden_size=160, num_attention_heads=2,
                               intermediate_size=320).to(dtype)(x).logits
        ours = ours_from(hf32, dtype=dtype)(x)
    assert ours.dtype == dtype
    assert_within_2x(ours, hf_half, ref, f"triton {dtype} logits")


def test_triton_backend_kv_cache_steps_equal_full_forward():
    model = ours_from(hf_model(num_hidden_layers=2))
    x = torch.randint(0, model.config.vocab_size, (2, 12), device=DEVICE)
    cache = model.new_cache(2, max_len=40)
    with torch.no_grad():
        full = model(x)
        prefill = model(x[:, :5], cache=cache, input_pos=torch.arange(5, device=DEVICE))
        steps = [model(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t], device=DEVICE)) for t in range(5, 12)]
    assert_rel_close(torch.cat([prefill, *steps], dim=1), full, FP32_LOGITS_REL, "cached vs full logits")


def test_triton_backend_left_padding_equals_sdpa_on_every_position():
    hf = hf_model()
    triton_model, sdpa_model = ours_from(hf), ours_from(hf, "sdpa")
    pad = 6
    x = torch.randint(2, 101, (2, 9), device=DEVICE)
    mask = (torch.arange(9, device=DEVICE) >= torch.tensor([[0], [pad]], device=DEVICE)).long()  # [2, 9]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = triton_model(x, position_ids=position_ids, attention_mask=mask)
        expected = sdpa_model(x, position_ids=position_ids, attention_mask=mask)
        alone = triton_model(x[1:, pad:])
    assert not out.isnan().any()
    assert_rel_close(out, expected, FP32_LOGITS_REL, "padded batch, padding positions included")
    assert_rel_close(out[1, pad:], alone[0], FP32_LOGITS_REL, "padded row vs the row alone")


def test_triton_backend_padded_cached_decode_equals_sdpa():
    hf = hf_model()
    models = {b: ours_from(hf, b) for b in ("triton", "sdpa")}
    x = torch.randint(2, 101, (2, 10), device=DEVICE)
    mask = torch.ones(2, 32, dtype=torch.long, device=DEVICE)
    mask[1, :3] = 0  # row 1 left-padded by 3; slots past the prompt stay 1 (unreached)
    position_ids = (mask[:, :10].cumsum(-1) - 1).clamp_min(0)
    logits = {}
    with torch.no_grad():
        for name, model in models.items():
            cache = model.new_cache(2, max_len=32)
            outs = [model(x[:, :7], position_ids=position_ids[:, :7], attention_mask=mask, cache=cache,
                          input_pos=torch.arange(7, device=DEVICE))]
            for t in range(7, 10):
                outs.append(model(x[:, t:t + 1], position_ids=position_ids[:, t:t + 1], attention_mask=mask,
                                  cache=cache, input_pos=torch.tensor([t], device=DEVICE)))
            logits[name] = torch.cat(outs, dim=1)
    assert_rel_close(logits["triton"], logits["sdpa"], FP32_LOGITS_REL, "padded cached decode")


def test_mask_spans_describe_the_dense_rule():
    """The kernels' two vectors (q_offset, k_start) describe exactly the mask the torch path builds from the rule."""
    input_pos = torch.arange(4, 9)  # [T = 5] slots in a 12-slot cache
    attention_mask = (torch.arange(12) >= torch.tensor([[0], [3], [7]])).long()  # [3, 12] left padding
    q_offset, k_start = ops.Mask(input_pos, attention_mask, 3, 12, "triton").spans
    assert q_offset.tolist() == [4, 4, 4] and k_start.tolist() == [0, 3, 7]
    dense = ops.Mask(input_pos, attention_mask, 3, 12, "sdpa").dense
    assert torch.equal(dense, dense_mask(5, 12, q_offset, k_start))


def test_mask_rejects_what_the_kernels_cannot_express():
    holes = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(ValueError, match="left padding only"):
        ops.Mask(torch.arange(4), holes, 1, 4, "triton")
    with pytest.raises(ValueError, match="consecutive input_pos"):
        ops.Mask(torch.tensor([0, 2]), None, 1, 4, "triton")
    with pytest.raises(ValueError, match="attention_mask covers 4 keys, attention sees 6"):
        ops.Mask(torch.arange(2), holes, 1, 6, "triton")
    future_zeros = torch.tensor([[0, 1, 1, 0]])  # slot 3 is out of reach of queries at 0..2: fine
    assert ops.Mask(torch.arange(3), future_zeros, 1, 4, "triton").spans[1].tolist() == [1]


def test_triton_attention_rejects_dense_masks_and_probabilities():
    q = torch.randn(1, 1, 3, 32, device=DEVICE)
    with pytest.raises(TypeError, match="takes an ops.Mask"):
        ops.attention(q, q, q, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="only available with backend='eager'"):
        ops.attention(q, q, q, ops.Mask(torch.arange(3, device=DEVICE), None, 1, 3, "triton"), return_probs=True)


def test_default_backend_is_triton_for_half_precision_on_cuda_only():
    model = GPTNeoX(Config(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                           intermediate_size=64))
    assert model.backend == "sdpa"  # CPU parameters
    half = "triton" if ops.triton_available() else "sdpa"
    assert [ops.default_backend(torch.device("cuda"), d) for d in (torch.bfloat16, torch.float16)] == [half, half]
    assert ops.default_backend(torch.device("cuda"), torch.float32) == "sdpa"  # fp32 kernels: slow to compile
    assert ops.default_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    model.backend = "eager"
    assert model.backend == "eager"


def test_kernels_load_from_an_uninstalled_checkout(tmp_path):
    """Without the installed package mapping, the top-level kernels/ folder is mounted as gptneox.kernels."""
    for folder in ("gptneox", "kernels"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "benchmarks"))
    code = ("import sys, torch; from gptneox import ops; k = ops.kernels(); "
            "assert k.__name__ == 'gptneox.kernels.api', k.__name__; print(k.__file__); "
            "print(sys.modules['gptneox.kernels.attention'].__file__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *site.getsitepackages()]), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "kernels" / "api.py"), str(tmp_path / "kernels" / "attention.py")]


def test_triton_backend_traces_fullgraph_under_torch_compile():
    """generate(compile=True) traces the decode step with fullgraph=True: backend "triton" must not break it."""
    torch._dynamo.reset()
    model = ours_from(hf_model())
    x = torch.randint(0, model.config.vocab_size, (2, 6), device=DEVICE)
    mask = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    mask[1, :2] = 0
    step = torch.compile(lambda t, pos: model(x[:, t:t + 1], attention_mask=mask, cache=cache, input_pos=pos),
                         backend="eager", fullgraph=True)
    with torch.no_grad():
        cache = model.new_cache(2, max_len=8)
        model(x[:, :5], attention_mask=mask, cache=cache, input_pos=torch.arange(5, device=DEVICE))
        compiled = step(5, torch.tensor([5], device=DEVICE))
        cache = model.new_cache(2, max_len=8)
        model(x[:, :5], attention_mask=mask, cache=cache, input_pos=torch.arange(5, device=DEVICE))
        eager = model(x[:, 5:6], attention_mask=mask, cache=cache, input_pos=torch.tensor([5], device=DEVICE))
    assert_rel_close(compiled, eager, FP32_LOGITS_REL, "compiled decode step")


def test_hooks_on_the_triton_backend_equal_eager_and_keep_the_kernels_elsewhere(monkeypatch):
    hf = hf_model()
    fused, eager = ours_from(hf), ours_from(hf, "eager")
    x = torch.randint(0, hf.config.vocab_size, (2, 7), device=DEVICE)
    with torch.no_grad():
        _, cache = fused.run_with_cache(x)  # pattern hooks: those layers' attention runs eagerly
        _, ref = eager.run_with_cache(x)
        for name in fused.hook_names():
            assert_rel_close(cache[name], ref[name], FP32_LOGITS_REL, name)
        calls = []
        real = ops.dispatch.fused_attention
        monkeypatch.setattr(ops.dispatch, "fused_attention", lambda *a: calls.append(1) or real(*a))
        plain = fused(x)
        hooked = fused.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_post", lambda t, name: None),
                                                    ("blocks.1.attn.hook_pattern", lambda t, name: None)])
    assert len(calls) == 2 + 1, "the plain forward, then layer 0 of the hooked one, ran the kernel"
    assert_rel_close(hooked, plain, FP32_LOGITS_REL, "a hooked forward that changes nothing")
