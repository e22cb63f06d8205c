"""The grouped LoRA kernels (shrink, expand, and both in grouped_lora) against a per-row gather written here."""

import pytest
import torch
from _cases import DEVICE, DTYPES, assert_matches
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gptneox.ops.runtime import kernels


def stacks(T, R, K, N, ranks, dtype, gen):
    """A [T, R, K] and B [T, N, R], tune t nonzero in its first ranks[t] columns only (the bank's zero padding)."""
    A = torch.zeros(T, R, K)
    B = torch.zeros(T, N, R)
    for t, r in enumerate(ranks):
        A[t, :r] = torch.randn(r, K, generator=gen) / K ** 0.5
        B[t, :, :r] = torch.randn(N, r, generator=gen) / r ** 0.5
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype)


def reference(y, x, A, B, idx, dtype):
    """y + B[idx[m]] A[idx[m]] x[m] per row (idx -1: y's row), gathered row by row, in `dtype`."""
    out = y.to(dtype).clone()
    for m, t in enumerate(idx.tolist()):
        if t >= 0:
            out[m] += B[t].to(dtype) @ (A[t].to(dtype) @ x[m].to(dtype))
    return out


def check(M, K, N, ranks, idx, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, R = len(ranks), max(ranks)
    A, B = stacks(T, R, K, N, ranks, dtype, gen)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    y = torch.randn(M, N, generator=gen).to(DEVICE, dtype)
    idx = torch.tensor(idx, dtype=torch.int64, device=DEVICE)
    y0 = y.clone()
    out = kernels().grouped_lora(y, x, A, B, idx)
    assert out is y and out.dtype == dtype  # in place
    what = f"M={M} K={K} N={N} ranks={ranks} idx={idx.tolist()} {dtype}"
    assert_matches(out, reference(y0, x, A, B, idx, dtype), reference(y0, x, A, B, idx, torch.float64), what)
    base = idx < 0
    assert torch.equal(out[base], y0[base]), f"{what}: a row without a tune changed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_lora_matches_per_row_gather(dtype):
    check(7, 40, 50, [4, 16, 1], [2, -1, 0, 0, 1, -1, 2], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=15, deadline=None)
@given(M=st.integers(1, 9), K=st.integers(1, 70), N=st.integers(1, 70),
       ranks=st.lists(st.integers(1, 16), min_size=1, max_size=4), data=st.data())
@example(M=1, K=1, N=1, ranks=[1], data=None)  # the smallest: one row, one column, rank 1
@example(M=5, K=33, N=17, ranks=[3, 16], data=None)  # K and N one past a multiple of the interpreter's block
def test_grouped_lora_matches_reference_on_random_shapes(dtype, M, K, N, ranks, data):
    T = len(ranks)
    idx = [m % (T + 1) - 1 for m in range(M)] if data is None else data.draw(
        st.lists(st.integers(-1, T - 1), min_size=M, max_size=M), label="idx")
    check(M, K, N, ranks, idx, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_and_expand_alone(dtype):
    """shrink gives fp32 h with zero rows for idx -1; expand adds B h on top of y for the other rows only."""
    gen = torch.Generator().manual_seed(1)
    A, B = stacks(2, 8, 24, 20, [8, 5], dtype, gen)
    x = torch.randn(4, 24, generator=gen).to(DEVICE, dtype)
    idx = torch.tensor([1, -1, 1, 0], dtype=torch.int32, device=DEVICE)
    h = kernels().lora_shrink(x, A, idx)
    assert h.shape == (4, 8) and h.dtype == torch.float32
    ref = torch.stack([A[t].double() @ x[m].double() if t >= 0 else torch.zeros(8, dtype=torch.float64, device=DEVICE)
                       for m, t in enumerate(idx.tolist())])
    torch.testing.assert_close(h.double(), ref, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    y = torch.zeros(4, 20, dtype=dtype, device=DEVICE)
    kernels().lora_expand(y, h, B, idx)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    torch.testing.assert_close(y[3].double(), B[0].double() @ h[3].double(), rtol=1e-5 if dtype == torch.float32
                               else 2e-3, atol=1e-3 if dtype != torch.float32 else 1e-6)


def test_grouped_lora_mixed_dtypes_and_empty_batch():
    """fp32 tunes on fp16 activations (a bank on a quantized base keeps its tunes in fp32); no rows at all."""
    gen = torch.Generator().manual_seed(2)
    A, B = stacks(2, 4, 30, 18, [4, 2], torch.float32, gen)
    x = torch.randn(3, 30, generator=gen).to(DEVICE, torch.float16)
    y = torch.randn(3, 18, generator=gen).to(DEVICE, torch.float16)
    idx = torch.tensor([1, 0, -1], device=DEVICE)
    ref = reference(y, x, A, B, idx, torch.float64)
    out = kernels().grouped_lora(y.clone(), x, A, B, idx)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=2e-3)
    empty = kernels().grouped_lora(y[:0].clone(), x[:0], A, B, idx[:0])
    assert empty.shape == (0, 18)


def test_grouped_lora_refuses_mismatched_tensors():
    A = torch.zeros(2, 4, 8, device=DEVICE)
    B = torch.zeros(2, 6, 4, device=DEVICE)
    x, y = torch.zeros(3, 8, device=DEVICE), torch.zeros(3, 6, device=DEVICE)
    idx = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="A: expected shape"):
        kernels().grouped_lora(y, torch.zeros(3, 9, device=DEVICE), A, B, idx)
    with pytest.raises(ValueError, match="B: expected shape"):
        kernels().grouped_lora(y, x, A, B[:, :5], idx)
    with pytest.raises(ValueError, match="idx"):
        kernels().grouped_lora(y, x, A, B, idx.float())
    with pytest.raises(ValueError, match="contiguous"):
        kernels().lora_expand(torch.zeros(6, 3, device=DEVICE).t(), torch.zeros(3, 4, device=DEVICE), B, idx)


# ------------------------------------------------------------------------------ the seam: AdapterBank's forward
def _tune(tmp_path, name, config, seed):
    from tiny import hf_model, hf_state_dict

    from gptneox import Config, GPTNeoX
    from gptneox.lora import add_lora, save_adapter
    hf = hf_model(0)
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict()))
    model.load_state_dict(hf_state_dict(hf))
    add_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, tmp_path / name)
    return tmp_path / name


def test_bank_forward_with_the_kernel_equals_the_torch_path(tmp_path, monkeypatch):
    """The bank's forward with the kernel forced (on CPU: the interpreter) equals its torch path: two tunes of
    different ranks and targets, a base row, a repeated tune; then a tune removed and another added (a new stack)."""
    from tiny import hf_model, hf_state_dict

    import gptneox.lora.bank as bank_module
    from gptneox import Config, GPTNeoX
    from gptneox.lora import AdapterBank, LoRAConfig
    paths = {"qv": _tune(tmp_path, "qv", LoRAConfig(4, 8.0, targets="query,value"), 1),
             "mlp": _tune(tmp_path, "mlp", LoRAConfig(8, 4.0, targets="dense_h_to_4h,dense_4h_to_h"), 2),
             "all": _tune(tmp_path, "all", LoRAConfig(2, 2.0, targets="key,dense,embed_out"), 3)}
    hf = hf_model(0)
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict())).to(DEVICE)
    model.load_state_dict(hf_state_dict(hf))
    model.eval()
    bank = AdapterBank(model)
    bank.add("qv", paths["qv"])
    bank.add("mlp", paths["mlp"])
    ids = torch.randint(0, 101, (4, 2), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    calls = []

    def forward(rows, kernel):
        monkeypatch.setattr(bank_module, "use_kernel", lambda x, y: calls.append(kernel) or kernel)
        with torch.no_grad(), bank.rows(rows):
            return model(ids)

    for rows in (["qv", None, "mlp", "qv"], ["mlp"] * 4):
        torch.testing.assert_close(forward(rows, True), forward(rows, False), msg=lambda m: f"{rows}: {m}")
    assert True in calls
    bank.remove("qv")
    bank.add("all", paths["all"])  # takes the freed slot: every layer's stack is rebuilt
    rows = ["all", "mlp", None, "all"]
    torch.testing.assert_close(forward(rows, True), forward(rows, False))
