"""Decode attention (flash-decoding): a few query tokens against a long KV cache, split over the cache length.

At batch 1 a decode step has only nh (batch, head) pairs of one query each: one program per pair would leave most
of a GPU idle. Here each row's keys are cut into chunks that run in parallel, each writing a partial output and
its logsumexp (fp32), and a combine pass merges them: o = sum_s exp(lse_s - lse) o_s. Per-row cache lengths come
from q_offset [B] (the slot of each row's first new token: keys beyond q_offset + T - 1 are unseen) and left
padding from k_start [B]; the kernel divides each row's own filled keys (read on the device) among the splits, so
a static cache of L slots costs only what is filled, with no host-side length (CUDA graphs, torch.compile). The
number of splits is fixed by L and the GPU. The kernels are those of attention_fwd.py (the forward with
num_splits > 1, and the combine), launched by attention.attention_fwd.
Inference only: no autograd. Reference: gptneox.ops.eager_attention with the model's dense mask over the cache.
Credits: Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference" (2023).
"""

import torch
import triton

from .attention import attention_fwd

BLOCK_N = 64  # keys per inner step; every split covers a multiple of it


def _num_splits(B: int, nh: int, L: int, device) -> int:
    """Enough (batch, head, split) programs for two waves over the GPU's SMs, no split shorter than BLOCK_N."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, B * nh), triton.cdiv(L, BLOCK_N), 64))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     q_offset: int | torch.Tensor, k_start: int | torch.Tensor | None = None, *,
                     kv_len: int | None = None, num_splits: int | None = None,
                     sm_scale: float | None = None) -> torch.Tensor:
    """Causal attention of q [B, nh, T, hs] (T new tokens at slots q_offset + 0..T-1) over the caches
    k_cache, v_cache [B, nh, L, hs] -> [B, nh, T, hs].

    kv_len (host int, optional): no row looks past this many slots; fewer splits are then launched (each row's
    splits already cover only its own filled slots).
    num_splits: default fills the GPU (two waves of programs); 1 is plain flash attention.
    """
    L = k_cache.shape[2]
    if kv_len is not None:
        if not 0 < kv_len <= L:
            raise ValueError(f"kv_len {kv_len} must be within the cache length {L}")
        k_cache, v_cache = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]  # views, no copy
        L = kv_len
    splits = num_splits or _num_splits(q.shape[0], q.shape[1], L, q.device)
    o, _ = attention_fwd(q, k_cache, v_cache, causal=True, q_offset=q_offset, k_start=k_start, sm_scale=sm_scale,
                         num_splits=splits, block_n=BLOCK_N)
    return o
