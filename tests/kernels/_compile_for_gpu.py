"""Compile the kernels ahead of time for a GPU target, no GPU needed: python _compile_for_gpu.py [--all] [--arch 90].

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects (types changing across
loop iterations, constexpr misuse, shared memory over the limit). Triton compiles to a cubin for a named target
without a device; this script does that for the kernels' launch configs and prints one line per kernel:
"ok <name> shared=<bytes> estimate=<bytes> regs=<n> spills=<bytes> tma=<n>" or "FAIL <name>: <why>". For the
attention kernels it compiles every config GPTNEOX_AUTOTUNE=quick can pick (fp32: its one config), plus at hd 256
the largest config of each full search that the autotune pruner keeps on sm_90, and fails when the compiler's shared
memory exceeds the pruner's estimate (kernels/attention_configs.py _smem_*: it must be an upper bound), when a default
config does not fit, when a 16-bit kernel at head size <= 128 spills registers (ptxas -v on the kernel's PTX: spill
stores plus loads), or when an attention kernel for sm_90 does not read through TMA (cp.async.bulk.tensor in its PTX).
Run by test_compile.py in a subprocess, because the tests' TRITON_INTERPRET=1 turns @triton.jit functions into
interpreted ones. The kernels are loaded from the checkout's kernels/ folder directly (they import nothing of gptneox).
"""

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (H100 / H200), CUDA programming guide
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def load_kernels():
    """kernels/ (a namespace package: no __init__.py) as the package gptneox_kernels_aot, whose relative imports
    then work, without importing gptneox."""
    spec = importlib.machinery.ModuleSpec("gptneox_kernels_aot", None, is_package=True)
    spec.submodule_search_locations = [str(KERNELS)]
    sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    return tuple(importlib.import_module(f"{spec.name}.{name}")
                 for name in ("attention_configs", "attention_fwd", "attention_bwd", "rotary", "quant_matmul"))


att_cfg, att_fwd, att_bwd, rotary, quant = load_kernels()


def compile_kernel(fn, arch, pointers, constexprs, num_warps, num_stages):
    """A cubin for sm_<arch>, specialised as a real launch of our shapes is: every pointer (torch allocations) and
    every integer (strides and lengths of head sizes 16..256 at T, S multiples of 16) divisible by 16. That matters:
    with it Triton pipelines the loads (cp.async, num_stages buffers) and shared memory grows with num_stages;
    without it, it does not, and the bytes measured here would be those of a kernel the GPU never runs."""
    sig = {name: "i32" for name in fn.arg_names}
    sig.update({name: t for name, t in pointers.items() if name in sig})
    sig.update({name: "fp32" for name in ("scale_log2e", "sm_scale") if name in sig})
    sig.update({name: "constexpr" for name in constexprs})
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name][0] in "*i"}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(c),): v for c, v in constexprs.items()}, attrs=divisible)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_report(kernel, arch) -> tuple[int, int]:
    """(registers per thread, spill stores + loads in bytes) as ptxas -v reports them for the kernel's PTX: Triton's
    metadata carries them only after loading on a GPU."""
    from triton.backends.nvidia import compiler as nvidia
    try:
        tool = nvidia.get_ptxas(arch)
    except TypeError:  # Triton 3.6: get_ptxas() takes no arch
        tool = nvidia.get_ptxas()
    path = getattr(tool, "path", tool)
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([path, "-v", "--gpu-name", gpu, str(ptx), "-o", str(Path(d) / "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def attention_kernels():
    """(name, kernel, shared memory estimate, the quick configs, the full search) for fwd, dk/dv and dq."""
    c, f, b = att_cfg, att_fwd, att_bwd
    return [("fwd", f._attn_fwd_kernel, c._smem_fwd, c._QUICK_FWD, [x for x in c._FWD_CONFIGS if c._keep_fwd(x)]),
            ("dkdv", b._attn_bwd_dkdv_kernel, c._smem_dkdv, c._QUICK_DKDV,
             [x for x in c._BWD_CONFIGS if c._keep_dkdv(x)]),
            ("dq", b._attn_bwd_dq_kernel, c._smem_dq, c._QUICK_DQ, [x for x in c._BWD_CONFIGS if c._keep_dq(x)])]


def largest_kept(configs, smem, e, D):
    """The config the pruner keeps on sm_90 whose estimate is closest to the limit: where a low estimate would bite."""
    kept = [c for c in configs if smem(c, e, D) <= SMEM_LIMIT]
    return max(kept, key=lambda c: smem(c, e, D))


def attention_cases(dtypes, head_dims, causal_only, quick=True, edge=False):
    """(name, kernel, pointer types, constexprs, num_warps, num_stages, estimate or None, must fit): the quick configs
    (fp32: its one config) and/or, at hd 256 in 16 bits, the largest config the pruner keeps (edge)."""
    defaults = (att_cfg._DEFAULT_CONFIG, att_cfg._DEFAULT_DKDV, *att_cfg._FP32_CONFIGS)
    for dt in dtypes:
        pointers = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
        pointers.update(lse_ptr="*fp32", delta_ptr="*fp32", q_off_ptr="*i32", k_start_ptr="*i32")
        for hs in head_dims:
            D0, D1 = att_cfg.split_head_dim(hs)
            for causal in (True,) if causal_only else (True, False):
                consts = dict(HS=hs, D0=D0, D1=D1, D1B=D1 or 16, CAUSAL=causal,
                              DOT_PRECISION="ieee" if dt == "fp32" else "tf32")
                for kind, fn, smem, quick_configs, full in attention_kernels():
                    configs = [] if not quick else att_cfg._FP32_CONFIGS if dt == "fp32" else list(quick_configs)
                    if edge and dt != "fp32" and hs == 256:
                        configs.append(largest_kept(full, smem, ELEMENT_SIZE[dt], D0 + D1))
                    for c in configs:
                        name = (f"{fn.__name__} {dt} hs={hs} causal={causal} BLOCK_M={c.kwargs['BLOCK_M']} "
                                f"BLOCK_N={c.kwargs['BLOCK_N']} warps={c.num_warps} stages={c.num_stages}")
                        no_spills = dt != "fp32" and hs <= 128  # issue 18: none at hd 128
                        yield (name, fn, pointers, {**consts, **c.kwargs}, c.num_warps, c.num_stages,
                               smem(c, ELEMENT_SIZE[dt], D0 + D1), c in defaults, no_spills, True)


def decode_cases():
    split = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*fp32", lse_ptr="*fp32", q_off_ptr="*i32",
                 k_start_ptr="*i32")
    yield ("_attn_fwd_kernel decode split bf16 hs=80", att_fwd._attn_fwd_kernel, split,
           dict(HS=80, D0=64, D1=16, D1B=16, CAUSAL=True, DOT_PRECISION="tf32", BLOCK_M=16, BLOCK_N=64), 4, 2,
           att_cfg._smem_fwd(att_cfg._config(16, 64, 2, 4), 2, 80), True, True, True)
    yield ("_attn_combine_kernel bf16 hs=80", att_fwd._attn_combine_kernel,
           dict(o_part_ptr="*fp32", lse_part_ptr="*fp32", o_ptr="*bf16", lse_ptr="*fp32"),
           dict(HS=80, BLOCK_S=16, BLOCK_D=128), 4, 2, None, True, True, False)
    yield ("_attn_bwd_delta_kernel bf16 hs=128", att_bwd._attn_bwd_delta_kernel,
           dict(o_ptr="*bf16", do_ptr="*bf16", delta_ptr="*fp32"),
           dict(HS=128, BLOCK_M=att_cfg._DELTA_BLOCK_M, BLOCK_D=128), 4, 1, None, True, True, False)


def rotary_cases(dtypes):
    for dt in dtypes:
        for has_slots in (False, True):
            yield (f"_rotary_fwd_kernel {dt} slots={has_slots}", rotary._rotary_fwd_kernel,
                   dict(qkv_ptr=f"*{dt}", q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", pos_ptr="*i64",
                        slot_ptr="*i64", inv_freq_ptr="*fp32"),
                   dict(HS=80, ROT=20, BLOCK_H=32, BLOCK_D=128, HAS_SLOTS=has_slots), 4, 1, None, True, True, False)
        yield (f"_rotary_bwd_kernel {dt}", rotary._rotary_bwd_kernel,
               dict(dq_ptr=f"*{dt}", dk_ptr=f"*{dt}", dv_ptr=f"*{dt}", dqkv_ptr=f"*{dt}", pos_ptr="*i64",
                    inv_freq_ptr="*fp32"),
               dict(HS=128, ROT=32, BLOCK_H=32, BLOCK_D=128), 4, 1, None, True, True, False)


def quant_cases(dtypes, quick=True):
    """The weight-only matmul kernels' quick configs (the defaults among them; quick=False: the defaults alone), int8
    and int4 g128, with the prefill shared memory estimate; none may spill registers."""
    decode, prefill = (quant.DECODE_QUICK, quant.PREFILL_QUICK) if quick else ([quant.DECODE_DEFAULT],
                                                                               [quant.PREFILL_DEFAULT])
    for dt in dtypes:
        pointers = dict(x_ptr=f"*{dt}", w_ptr="*i8", s_ptr=f"*{dt}", z_ptr=f"*{dt}", y_ptr=f"*{dt}")
        for int4 in (False, True):
            scheme = dict(GROUP=128 if int4 else 2, INT4=int4)
            w = dict(pointers, w_ptr="*u8" if int4 else "*i8")
            for c in decode:
                yield (f"_quant_matmul_decode_kernel {dt} int4={int4} {c.kwargs} warps={c.num_warps} "
                       f"stages={c.num_stages}", quant._quant_matmul_decode_kernel, w, {**scheme, **c.kwargs},
                       c.num_warps, c.num_stages, None, True, True, False)
            for c in prefill:
                yield (f"_quant_matmul_prefill_kernel {dt} int4={int4} {c.kwargs} warps={c.num_warps} "
                       f"stages={c.num_stages}", quant._quant_matmul_prefill_kernel, w,
                       {**scheme, **c.kwargs, "PRECISION": "tf32"}, c.num_warps, c.num_stages,
                       quant._smem_prefill(c, ELEMENT_SIZE[dt]), True, True, False)


def verdict(shared, estimate, must_fit, spills, no_spills, tma, needs_tma) -> str:
    if estimate is not None and shared > estimate:
        return f"FAIL shared memory {shared} exceeds the pruner's estimate {estimate}"
    if must_fit and shared > SMEM_LIMIT:
        return f"FAIL shared memory {shared} exceeds sm_90's {SMEM_LIMIT}"
    if no_spills and spills:
        return f"FAIL {spills} bytes of register spills"
    if needs_tma and not tma:
        return "FAIL no TMA load (cp.async.bulk.tensor) in the PTX"
    return "ok"


def main(*, all, arch):
    if all:
        cases = [*attention_cases(["bf16", "fp16", "fp32"], [32, 64, 80, 96, 128, 256], False, edge=True),
                 *decode_cases(), *rotary_cases(["bf16", "fp16", "fp32"]), *quant_cases(["bf16", "fp16"])]
    else:  # bf16 at Pythia's awkward (80) and common (128) head sizes, fp32's config, the edge configs at hd 256
        cases = [*attention_cases(["bf16"], [80, 128], True), *attention_cases(["fp32"], [64], True),
                 *attention_cases(["bf16"], [256], True, quick=False, edge=True), *decode_cases(),
                 *rotary_cases(["bf16"]), *quant_cases(["bf16"], quick=False)]
    for name, fn, pointers, consts, warps, stages, estimate, must_fit, no_spills, needs_tma in cases:
        try:
            kernel = compile_kernel(fn, arch, pointers, consts, warps, stages)
            shared = kernel.metadata.shared
            regs, spills = ptxas_report(kernel, arch)
            tma = kernel.asm["ptx"].count("cp.async.bulk.tensor")
            status = verdict(shared, estimate, must_fit, spills, no_spills, tma, needs_tma and arch >= 90)
            print(f"{status if status == 'ok' else 'FAIL'} {name} shared={shared} estimate={estimate} regs={regs} "
                  f"spills={spills} tma={tma}{'' if status == 'ok' else ': ' + status}", flush=True)
        except Exception as e:  # report every kernel, not just the first failure
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true",
                        help="every dtype, head size and causality (tens of minutes), not the quick set")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int: 90 = H100 / H200")
    main(**vars(parser.parse_args()))
