"""Launch configs of the flash attention kernels and their autotuning (docs/kernels.md, "Autotuning").

The search spaces, the default, fp32 and GPTNEOX_AUTOTUNE=quick configs, the autotune key (seq_bucket), the shared
memory each config needs (_smem_*), and the early_config_prune callback (_prune) that keeps the candidates of the
mode that fit the device; _autotune wraps a kernel with all of it (attention_fwd.py, attention_bwd.py).
"""

import torch
import triton

from ._utils import autotune_configs, configs_for_mode, max_shared_memory, split_head_dim


# GPU search space (H100 starting points from tutorial 06 and FA2). Keyed on the head split, causality, the argument
# dtypes (Triton adds them) and a power-of-two bucket of each sequence length (seq_bucket), so a new length retunes
# only when it changes bucket. For each new key, _prune first drops the configs whose shared memory cannot fit the
# device (Triton would compile them in full before the launch fails) and gives fp32 its own tiny list (exact "ieee"
# dots are FMA loops, slow to compile: docs/kernels.md, "Autotuning").
def _config(m, n, s, w):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w)


_FWD_CONFIGS = [_config(m, n, s, w) for m in (64, 128) for n in (32, 64, 128) for s in (2, 3, 4) for w in (4, 8)]


def _keep_fwd(c):
    return not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4) and c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"]


_BWD_CONFIGS = [_config(m, n, s, w) for m in (32, 64, 128) for n in (32, 64, 128) for s in (2, 3) for w in (4, 8)]


def _keep_dkdv(c):  # FA2: a block of keys stays resident while query blocks stream past, so BLOCK_M <= BLOCK_N
    return c.kwargs["BLOCK_M"] <= c.kwargs["BLOCK_N"]


def _keep_dq(c):  # and the other way round for dq
    return c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"]


_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_stages=1, num_warps=4)  # small: numpy runs it
_DEFAULT_CONFIG = _config(64, 32, 2, 4)  # 16-bit fwd and dq: fits every head size on sm_90 (test_compile.py)
# dk/dv holds two [N, D] fp32 accumulators and the k, v blocks: at hd 128, 64 x 32 over 4 warps spills registers
# on sm_90, 32 x 64 over 8 warps none (docs/kernels.md, "Autotuning")
_DEFAULT_DKDV = _config(32, 64, 2, 8)
# fp32 searches this one config in every mode: smaller blocks over 8 warps give each thread a quarter of the unrolled
# FMA dot, so it compiles for sm_90 in a tenth of the time (docs/kernels.md, "Autotuning"); SDPA is the model's fp32
# path anyway
_FP32_CONFIGS = [_config(32, 32, 2, 8)]
# GPTNEOX_AUTOTUNE=quick: the likely H100 / H200 winners (tutorial 06's Hopper choices; FA2's block shapes), plus
# the default config, which the tests compile too (Triton's disk cache then serves it)
_QUICK_FWD = [_config(128, 64, 3, 8), _config(64, 64, 3, 4), _DEFAULT_CONFIG]
_QUICK_DKDV = [_config(32, 128, 2, 8), _config(64, 64, 2, 8), _DEFAULT_DKDV]
_QUICK_DQ = [_config(128, 32, 2, 8), _config(64, 64, 2, 4), _DEFAULT_CONFIG]
_KEY = ["D0", "D1", "CAUSAL", "T_BUCKET", "S_BUCKET"]
_DELTA_BLOCK_M = 64  # rows per program of the delta kernel (a streaming reduction: no tuning)


def seq_bucket(n: int) -> int:
    """The autotune key of a sequence length: its power of two, clamped to 128..16384 (block choices change with the
    number of blocks, not with every length)."""
    return min(max(triton.next_power_of_2(max(n, 1)), 128), 16384)


# Shared memory per program in bytes, for element size e, head blocks D = D0 + D1 and s = num_stages: upper bounds
# of what Triton 3.6 and 3.9 allocate for sm_90 when a real launch specialises the strides (divisible by 16), so
# that the loads are pipelined into s buffers; test_compile.py checks them against the compiler's metadata.shared.
# Forward: the q block [M, D] and s buffers of the k and v blocks [N, D]. dq: q and do, s buffers of k and v.
# dk/dv: k and v [N, D], s buffers of q and do [M, D], and p^T, ds^T [N, M].
_SMEM_SLACK = 2048  # barriers


def _smem_fwd(c, e, D):
    M, N, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    return e * D * (M + 2 * s * N) + _SMEM_SLACK


def _smem_dkdv(c, e, D):
    M, N, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    return e * D * (2 * N + 2 * s * M) + 2 * e * M * N + _SMEM_SLACK


def _smem_dq(c, e, D):
    M, N, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    return e * D * (2 * M + 2 * s * N) + _SMEM_SLACK


def _prune(smem, configs, quick, default=_DEFAULT_CONFIG):
    """early_config_prune for triton.autotune: the candidates of GPTNEOX_AUTOTUNE (fp32: _FP32_CONFIGS) whose
    estimated shared memory fits this device, or the kernel's default config when none does.

    Triton 3.6 and 3.9 call it as prune(configs, named_args, **kwargs), named_args being the positional arguments
    and kwargs the keyword ones (our constexprs); Triton 2.x passed named_args alone. So everything comes from q_ptr,
    positional in every version: its dtype (element size), head size (D0 + D1) and device (the limit)."""
    def prune(_every, named_args, **kwargs):
        q = named_args["q_ptr"]
        e, D = q.element_size(), sum(split_head_dim(q.shape[-1]))
        fp32 = q.dtype == torch.float32
        candidates = _FP32_CONFIGS if fp32 else configs_for_mode(configs, default, quick)
        limit = max_shared_memory(q.device.index)
        return [c for c in candidates if smem(c, e, D) <= limit] or [_FP32_CONFIGS[0] if fp32 else default]
    return prune


def _autotune(kernel, configs, quick, smem, default=_DEFAULT_CONFIG):
    """kernel under triton.autotune; the interpreter sees one config (autotune_configs), a GPU goes through _prune."""
    every = autotune_configs([*configs, *_FP32_CONFIGS], _INTERPRET_CONFIG, default, quick)
    prune = _prune(smem, configs, quick, default)
    return triton.autotune(every, key=_KEY, prune_configs_by={"early_config_prune": prune})(kernel)


# the launchers' shortcut where a single candidate can win (GPTNEOX_AUTOTUNE=0, fp32): kernel name -> its pruner
_PRUNE = {"fwd": _prune(_smem_fwd, [], _QUICK_FWD), "bwd_dkdv": _prune(_smem_dkdv, [], _QUICK_DKDV, _DEFAULT_DKDV),
          "bwd_dq": _prune(_smem_dq, [], _QUICK_DQ)}  # mode 0 and fp32 only: the default / fp32 config
