"""The public functions of the Triton kernels for GPT-NeoX (fused partial rotary, flash attention, flash-decoding,
int8 / int4 matmul, grouped LoRA): `gptneox.kernels.api`.

The repository's kernels/ folder installs as `gptneox.kernels` (setup.py `package_dir`) and is deliberately not a
regular package: it has no __init__.py, so from any working directory (the repository root included, which Python
puts first on sys.path) `import kernels` finds a regular package of that name first, such as the PyPI distribution
`kernels` that transformers imports, and never this folder (README, "Install"). Imports inside this folder are
relative for that reason; from an uninstalled checkout, gptneox.ops loads it under the same name (ops.kernels()).

The reference for every kernel is the torch path in gptneox/ops/ (reference.py); gptneox.ops dispatches here for
backend="triton". Public functions (each differentiable unless noted):
    rotary(qkv, position_ids, num_heads, rotary_ndims, base, k_cache=, v_cache=, input_pos=) -> q, k, v
    attention(q, k, v, causal=, q_offset=, k_start=, sm_scale=) -> o
    decode_attention(q, k_cache, v_cache, q_offset, k_start, kv_len=, num_splits=) -> o   (inference only)
    quant_matmul(x, weight, scales, zeros=, group_size=) -> x W^T, W int8 / int4 (inference only)
    grouped_lora(y, x, A, B, idx) -> y, y[m] += B[idx[m]] A[idx[m]] x[m] in place, many LoRA tunes in one batch
        (lora_shrink / lora_expand, its two launches; inference only)
The launchers (rotary_fwd / rotary_bwd, attention_fwd / attention_bwd) skip autograd, for tests and benchmarks;
best_configs() names the launch config each autotuned attention kernel last used (GPTNEOX_AUTOTUNE: docs/kernels.md).
The model reaches the launchers through gptneox/ops/custom.py, which registers them as torch.library custom ops
(torch.ops.gptneox.rotary, rotary_into_cache, attention, decode_attention and the backward ops) so that
torch.compile(fullgraph=True) and CUDA graphs keep them; this package itself imports nothing of gptneox.
"""

from .attention import AttentionFunction, attention, attention_bwd, attention_fwd, best_configs
from ._utils import interpreting
from .decode import decode_attention
from .lora import grouped_lora, lora_expand, lora_shrink
from .quant_matmul import quant_matmul, quant_matmul_fwd
from .rotary import RotaryFunction, rotary, rotary_bwd, rotary_fwd

__all__ = ["rotary", "attention", "decode_attention", "rotary_fwd", "rotary_bwd", "attention_fwd", "attention_bwd",
           "RotaryFunction", "AttentionFunction", "best_configs",
           "quant_matmul", "quant_matmul_fwd", "grouped_lora", "lora_shrink", "lora_expand", "interpreting"]
