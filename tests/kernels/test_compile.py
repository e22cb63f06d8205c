"""Every kernel compiles for an H100 (sm_90) without a GPU (what the CPU interpreter cannot check), within the shared
memory the autotune pruner estimates for it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_compile_for_gpu.py")


def compile_all(*args):
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    failed = [line for line in lines if line.startswith("FAIL")]
    assert not failed, "\n".join(failed)
    return lines


@pytest.mark.slow  # Triton's compiler for sm_90 in a fresh process: ~15 s
def test_kernels_compile_for_sm90_within_the_autotune_estimate():
    """The quick configs at hs 80 and 128 (bf16), fp32's config, the largest kept configs at hs 256: the compiler's
    shared memory never exceeds the pruner's estimate, so a config the pruner keeps is one that fits; no 16-bit
    attention kernel at hs <= 128 spills registers; every attention kernel reads through TMA on sm_90."""
    lines = compile_all()
    assert len(lines) == 2 * 3 * 3 + 3 + 3 + 3 + 3 + 4  # 2 hs x 3 kernels x 3 quick, fp32, hs 256, decode + delta,
    # rotary, and the weight-only matmuls' defaults (decode, prefill) x (int8, int4); --all compiles their quick lists
    attention = [line for line in lines if "_attn_" in line and "combine" not in line and "delta" not in line]
    assert attention and all(" tma=0" not in line for line in attention)


@pytest.mark.slow
def test_kernels_compile_for_sm90_every_dtype_and_head_dim():
    compile_all("--all")
