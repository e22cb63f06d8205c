"""The kernels as torch.library custom ops (gptneox/ops/custom.py): opcheck on every op (schema, fake tensors and
their strides, autograd registration, AOT dispatch), the torch path they take on a CPU without the interpreter
against the kernels, and torch.compile(fullgraph=True) keeping them in the model's forward, its backward, the
compiled mask check and the Generator's compiled decode step. Four compiled graphs in all (two with Inductor)."""

import pytest
import torch
from _cases import DEVICE, DTYPES
from functorch.compile import make_boxed_func
from tiny import hf_model, hf_state_dict
from tolerances import FP32_GRAD_REL, FP32_LOGITS_REL, assert_rel_close
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.compile_fx import compile_fx

from gptneox import Config, GPTNeoX, Generator, causal_lm_loss, ops
from gptneox.ops import custom as kernel_ops

B, nh, T, S, L, hs, rot = 2, 2, 5, 9, 20, 32, 8  # batch, heads, queries, keys, cache slots, head size, rotary dims
OPS = ("rotary", "rotary_bwd", "rotary_into_cache", "attention", "attention_bwd", "decode_attention", "quant_matmul")


def rows(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)  # a [B] vector of the mask spans


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def op_args(name: str, dtype: torch.dtype) -> tuple:
    """Inputs of op `name`, differentiable ones requiring grad. Row 1 is left-padded; positions are per row."""
    position_ids = torch.arange(3, 3 + T, device=DEVICE) - rows(0, 1)[:, None]  # [B, T]
    if name == "rotary":
        return randn(B, T, nh * 3 * hs, dtype=dtype).requires_grad_(), position_ids, nh, rot, 10000.0
    if name == "rotary_bwd":
        return randn(B, nh, T, hs, dtype=dtype), randn(B, nh, T, hs, dtype=dtype), randn(B, nh, T, hs, dtype=dtype), \
            position_ids, rot, 10000.0
    if name == "rotary_into_cache":
        return (randn(B, T, nh * 3 * hs, dtype=dtype), position_ids, randn(B, nh, L, hs, dtype=dtype),
                randn(B, nh, L, hs, dtype=dtype), torch.arange(3, 3 + T, device=DEVICE), nh, rot, 10000.0)
    if name == "quant_matmul":  # an int4 weight, K 40 not a multiple of the group of 32 (padded)
        from gptneox.quant.schemes import quantize_weight
        t = quantize_weight(randn(24, 40, dtype=dtype), "int4", 32)
        return randn(3, 40, dtype=dtype), t["weight"], t["scales"], t["zeros"], 32
    q, k, v = randn(B, nh, T, hs, dtype=dtype), randn(B, nh, S, hs, dtype=dtype), randn(B, nh, S, hs, dtype=dtype)
    spans = rows(4, 2), rows(0, 3)  # q_offset, k_start: row 1's queries sit at slots 2..6 after 3 pads
    if name == "attention":
        return (*(t.requires_grad_() for t in (q, k, v)), *spans)
    if name == "attention_bwd":
        o, lse = torch.ops.gptneox.attention(q, k, v, *spans)
        return randn(B, nh, T, hs, dtype=dtype), q, k, v, o, lse, *spans
    assert name == "decode_attention", name
    return randn(B, nh, 1, hs, dtype=dtype), randn(B, nh, L, hs, dtype=dtype), randn(B, nh, L, hs, dtype=dtype), \
        rows(7, 12), rows(0, 4)


def run_torch_path(monkeypatch):
    """Make the ops take their torch path, as on a CPU without TRITON_INTERPRET."""
    monkeypatch.setattr(kernel_ops, "on_kernels", lambda t: False)


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)  # bf16: CUDA only (the GPU check's tests section runs it)
@pytest.mark.parametrize("name", OPS)
def test_custom_op_passes_opcheck(name, dtype, path, monkeypatch):
    if path == "torch":
        run_torch_path(monkeypatch)
    torch.library.opcheck(getattr(torch.ops.gptneox, name).default, op_args(name, dtype))


@pytest.mark.parametrize("name", OPS)
def test_custom_op_torch_path_equals_the_kernels(name, monkeypatch):
    """Every output (and, for rotary_into_cache, the caches) in fp32 and with the same strides."""
    args = op_args(name, torch.float32)
    op = getattr(torch.ops.gptneox, name)
    kernel_args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch_args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    expected = op(*kernel_args)
    run_torch_path(monkeypatch)
    got = op(*torch_args)
    expected, got = (out if isinstance(out, tuple) else (out,) for out in (expected, got))
    if name == "rotary_into_cache":
        expected, got = (*expected, *kernel_args[2:4]), (*got, *torch_args[2:4])
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, msg=lambda m: f"{name} output {i}: {m}")
        assert g.stride() == e.stride(), f"{name} output {i}: strides {g.stride()} vs the kernels' {e.stride()}"


def test_attention_op_output_is_a_view_of_a_bthd_buffer():
    """o [B, nh, T, hs] lies in memory as [B, T, nh, hs], so the model's y.transpose(1, 2).reshape(B, T, C) is free."""
    for name in ("attention", "decode_attention"):
        out = getattr(torch.ops.gptneox, name)(*op_args(name, torch.float32))
        o = out[0] if name == "attention" else out
        assert o.transpose(1, 2).is_contiguous(), (name, o.stride())


# --------------------------------------------------------------------------------------------- under compile
def tiny_model(**overrides) -> GPTNeoX:
    hf = hf_model(num_hidden_layers=2, **overrides)
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict()), backend="triton")
    model.load_state_dict(hf_state_dict(hf), strict=True)
    return model.to(DEVICE).eval()


def targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def gptneox_ops(names: list[str]) -> list[str]:
    return [name for name in names if name.startswith("gptneox.")]  # torch.ops.gptneox.<op>.default


def recorder(graphs: dict, name: str):
    """An AOT compiler that notes what each graph it is given calls, then runs the graph as it is."""
    def compile(gm, example_inputs):
        graphs[name] = targets(gm)
        return make_boxed_func(gm.forward)
    return compile


def recording_inductor(graphs: dict):
    """A Dynamo backend that notes what the traced graph calls, then hands it to Inductor."""
    def backend(gm, example_inputs):
        graphs["dynamo"] = targets(gm)
        return compile_fx(gm, example_inputs)
    return backend


def left_padded(model):
    x = torch.randint(1, model.config.vocab_size, (2, 7), device=DEVICE)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    return x, mask, (mask.cumsum(-1) - 1).clamp_min(0)  # input_ids, attention_mask, position_ids [2, 7]


def test_compiled_forward_keeps_the_kernels_and_equals_eager():
    torch._dynamo.reset()
    model, graphs = tiny_model(), {}
    x, mask, pos = left_padded(model)
    forward = torch.compile(lambda x: model(x, attention_mask=mask, position_ids=pos), backend=recording_inductor(
        graphs), fullgraph=True)
    with torch.no_grad():
        compiled, eager = forward(x), model(x, attention_mask=mask, position_ids=pos)
    assert gptneox_ops(graphs["dynamo"]) == ["gptneox.rotary.default", "gptneox.attention.default"] * 2
    assert not any("scaled_dot_product" in t for t in graphs["dynamo"]), "the torch path was traced"
    assert_rel_close(compiled, eager, FP32_LOGITS_REL, "compiled vs eager logits")


def test_gradients_through_a_compiled_forward_equal_eager():
    torch._dynamo.reset()
    model, graphs = tiny_model(), {}
    x, mask, pos = left_padded(model)
    backend = aot_autograd(fw_compiler=recorder(graphs, "forward"), bw_compiler=recorder(graphs, "backward"))
    loss_of = lambda f: causal_lm_loss(f(x, attention_mask=mask, position_ids=pos), x)  # noqa: E731
    compiled = torch.autograd.grad(loss_of(torch.compile(model, backend=backend, fullgraph=True)),
                                   list(model.parameters()))
    eager = torch.autograd.grad(loss_of(model), list(model.parameters()))
    assert gptneox_ops(graphs["forward"]) == ["gptneox.rotary.default", "gptneox.attention.default"] * 2
    assert gptneox_ops(graphs["backward"]) == ["gptneox.attention_bwd.default", "gptneox.rotary_bwd.default"] * 2
    for (name, _), g, e in zip(model.named_parameters(), compiled, eager, strict=True):
        assert_rel_close(g, e, FP32_GRAD_REL, f"grad {name}")


def test_compiled_mask_check_asserts_without_a_graph_break():
    """Holes in the mask: a ValueError in eager (test_triton_backend.py), a device-side assert under compile."""
    torch._dynamo.reset()
    model = tiny_model()
    x = torch.randint(1, model.config.vocab_size, (1, 4), device=DEVICE)
    forward = torch.compile(lambda x, mask: model(x, attention_mask=mask), backend="eager", fullgraph=True)
    with torch.no_grad():
        forward(x, torch.tensor([[0, 1, 1, 1]], device=DEVICE))  # left padding: fine
        with pytest.raises(RuntimeError, match="use backend='sdpa' for other masks"):
            forward(x, torch.tensor([[1, 0, 1, 1]], device=DEVICE))


def test_compiled_generator_decodes_with_the_decode_op_token_for_token(monkeypatch):
    """Generator(compile=True) under Inductor: the same greedy tokens as eager, and every compiled step runs the
    decode and rotary-into-cache kernels (a step that fell back to SDPA would not call them). Eager calls the
    launchers directly (kernels.rotary), the ops call kernels.rotary_fwd: both count as the rotary kernel."""
    torch._dynamo.reset()
    model, kernels, N = tiny_model(), ops.kernels(), 5
    calls = {"decode_attention": 0, "rotary": 0}
    for name, counted in (("decode_attention", "decode_attention"), ("rotary", "rotary"), ("rotary_fwd", "rotary")):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=counted, **kw: calls.update(
            {_name: calls[_name] + 1}) or _real(*a, **kw))
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]  # left-padded by 3
    settings = dict(max_new_tokens=N, temperature=0, eos_token_id=[])
    eager = Generator(model).generate(prompts, **settings)
    assert calls == {"decode_attention": 2 * N, "rotary": 2 * N}  # 2 layers x (prefill + N - 1 steps)
    compiled = Generator(model, compile=True).generate(prompts, **settings)
    assert calls == {"decode_attention": 4 * N, "rotary": 4 * N}, "a compiled step ran without the kernels"
    assert torch.equal(compiled, eager), (compiled, eager)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_generator_keeps_the_quantized_matmul_kernel(mode, monkeypatch):
    """A quantized model under Generator(compile=True): the same greedy tokens as eager, and the compiled steps run
    the weight-only matmul kernel (QuantizedLinear calls the gptneox::quant_matmul op while compiling)."""
    from gptneox import quantize
    torch._dynamo.reset()
    model, kernels, N = tiny_model(), ops.kernels(), 4
    quantize(model, mode, group_size=32)
    calls = []
    real = kernels.quant_matmul
    monkeypatch.setattr(kernels, "quant_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    settings = dict(max_new_tokens=N, temperature=0, eos_token_id=[])
    eager = Generator(model).generate([[5, 6, 7, 8]], **settings)
    calls.clear()
    compiled = Generator(model, compile=True).generate([[5, 6, 7, 8]], **settings)
    assert torch.equal(compiled, eager), (compiled, eager)
    assert len(calls) >= (N - 1) * 2 * 4, "the compiled steps did not run the quantized matmul kernel"  # 4 per layer
