"""Compile every kernel ahead of time for a GPU target, no GPU needed: python _compile_for_gpu.py [--all] [--arch 90].

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects (types changing across
loop iterations, constexpr misuse, shared memory over the limit). Triton compiles to a cubin for a named target
without a device; this script does that for the kernels' launch configs and prints one line per kernel:
"ok <name> shared=<bytes>" or "FAIL <name>: <error>". Run by test_compile.py in a subprocess, because the tests'
TRITON_INTERPRET=1 turns @triton.jit functions into interpreted ones.
"""

import argparse
import importlib
import os

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

attention = importlib.import_module("gptneox.kernels.attention")
rotary = importlib.import_module("gptneox.kernels.rotary")
split_head_dim = importlib.import_module("gptneox.kernels._utils").split_head_dim
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (H100 / H200), CUDA programming guide


def compile_kernel(fn, arch, pointers, constexprs, num_warps, num_stages):
    sig = {name: "i32" for name in fn.arg_names}
    sig.update({name: t for name, t in pointers.items() if name in sig})
    sig.update({name: "fp32" for name in ("scale_log2e", "sm_scale") if name in sig})
    sig.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(c),): v for c, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def attention_cases(dtypes, head_dims, causal_only):
    for dt in dtypes:
        pointers = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
        pointers.update(lse_ptr="*fp32", delta_ptr="*fp32", q_off_ptr="*i32", k_start_ptr="*i32")
        for hs in head_dims:
            D0, D1 = split_head_dim(hs)
            for causal in (True,) if causal_only else (True, False):
                consts = dict(HS=hs, D0=D0, D1=D1, D1B=D1 or 16, CAUSAL=causal,
                              DOT_PRECISION="ieee" if dt == "fp32" else "tf32", **attention._DEFAULT_CONFIG.kwargs)
                cfg = attention._DEFAULT_CONFIG
                for fn in (attention._attn_fwd_kernel, attention._attn_bwd_dkdv_kernel, attention._attn_bwd_dq_kernel):
                    name = f"{fn.__name__} {dt} hs={hs} causal={causal}"
                    yield name, fn, pointers, consts, cfg.num_warps, cfg.num_stages
    split = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*fp32", lse_ptr="*fp32", q_off_ptr="*i32",
                 k_start_ptr="*i32")
    yield ("_attn_fwd_kernel decode split bf16 hs=80", attention._attn_fwd_kernel, split,
           dict(HS=80, D0=64, D1=16, D1B=16, CAUSAL=True, DOT_PRECISION="tf32", BLOCK_M=16, BLOCK_N=64), 4, 2)
    yield ("_attn_combine_kernel bf16 hs=80", attention._attn_combine_kernel,
           dict(o_part_ptr="*fp32", lse_part_ptr="*fp32", o_ptr="*bf16", lse_ptr="*fp32"),
           dict(HS=80, BLOCK_S=16, BLOCK_D=128), 4, 2)


def rotary_cases(dtypes):
    for dt in dtypes:
        for has_slots in (False, True):
            yield (f"_rotary_fwd_kernel {dt} slots={has_slots}", rotary._rotary_fwd_kernel,
                   dict(qkv_ptr=f"*{dt}", q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", pos_ptr="*i64",
                        slot_ptr="*i64", inv_freq_ptr="*fp32"),
                   dict(HS=80, ROT=20, BLOCK_H=32, BLOCK_D=128, HAS_SLOTS=has_slots), 4, 1)
        yield (f"_rotary_bwd_kernel {dt}", rotary._rotary_bwd_kernel,
               dict(dq_ptr=f"*{dt}", dk_ptr=f"*{dt}", dv_ptr=f"*{dt}", dqkv_ptr=f"*{dt}", pos_ptr="*i64",
                    inv_freq_ptr="*fp32"),
               dict(HS=128, ROT=32, BLOCK_H=32, BLOCK_D=128), 4, 1)


def main(*, all, arch):
    dtypes = ["bf16", "fp16", "fp32"] if all else ["bf16"]
    head_dims = [32, 64, 80, 96, 128, 256] if all else [80, 128]
    for name, fn, pointers, consts, warps, stages in [*attention_cases(dtypes, head_dims, not all),
                                                         *rotary_cases(dtypes)]:
        try:
            shared = compile_kernel(fn, arch, pointers, consts, warps, stages).metadata.shared
            status = "ok" if shared <= SMEM_LIMIT else "FAIL"
            print(f"{status} {name} shared={shared}", flush=True)
        except Exception as e:  # report every kernel, not just the first failure
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true",
                        help="every dtype, head size and causality (minutes), not the quick set")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int: 90 = H100 / H200")
    main(**vars(parser.parse_args()))
