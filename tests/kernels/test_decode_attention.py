"""Decode attention (flash-decoding, kernels/decode.py) against the torch path over a dense cache mask."""

import pytest
import torch
from _cases import DEVICE, DTYPES, assert_matches, dense_mask
from hypothesis import given
from hypothesis import strategies as st

from gptneox import ops
from gptneox.ops.runtime import kernels


def check_decode(B, nh, T, L, hs, dtype, cache_len, k_start, num_splits=None, kv_len=None):
    q_offset = torch.tensor(cache_len, device=DEVICE)  # [B] slot of each row's first new token
    k_start = torch.tensor(k_start, device=DEVICE)
    q32, k32, v32 = (torch.randn(B, nh, n, hs, device=DEVICE) for n in (T, L, L))
    mask = dense_mask(T, L, q_offset, k_start)
    ref = ops.eager_attention(q32, k32, v32, mask)
    q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
    base = ops.sdpa_attention(q, k, v, mask)
    out = kernels().decode_attention(q, k, v, q_offset, k_start, num_splits=num_splits, kv_len=kv_len)
    assert out.dtype == dtype and not out.isnan().any()
    assert_matches(out, base, ref, f"decode B={B} T={T} L={L} hs={hs} splits={num_splits} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hs", [64, 80, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_decode_attention_matches_reference_per_row_lengths(num_splits, hs, dtype):
    check_decode(3, 2, 1, 200, hs, dtype, cache_len=[199, 70, 3], k_start=[0, 30, 2], num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(B=st.integers(1, 3), nh=st.integers(1, 2), T=st.integers(1, 4), L=st.integers(4, 150),
       hs=st.sampled_from([32, 80, 96, 256]), splits=st.sampled_from([None, 1, 2, 7]), data=st.data())
def test_decode_attention_matches_reference_on_random_shapes(dtype, B, nh, T, L, hs, splits, data):
    cache_len = [data.draw(st.integers(0, L - T)) for _ in range(B)]
    k_start = [data.draw(st.integers(0, c + T - 1)) for c in cache_len]
    check_decode(B, nh, T, L, hs, dtype, cache_len, k_start, num_splits=splits)


def test_decode_attention_kv_len_limits_the_keys_read():
    check_decode(2, 2, 2, 300, 64, torch.float32, cache_len=[90, 40], k_start=[0, 5], kv_len=92)
    with pytest.raises(ValueError, match="kv_len 301 must be within the cache length 300"):
        check_decode(1, 1, 1, 300, 64, torch.float32, cache_len=[9], k_start=[0], kv_len=301)
