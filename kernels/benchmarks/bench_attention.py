"""Flash attention TFLOP/s, forward and backward, against torch SDPA (flash and cuDNN backends) in the same run.

FLOPs (FlashAttention's convention, docs/performance.md, "Limits"): forward 4 * B * nh * S^2 * hs, halved
when causal; backward 2.5 x forward. Shapes: head sizes at Pythia widths (hd 64: pythia-410m, 80: pythia-2.8b /
dolly-v2-3b, 128: pythia-6.9b, 256: pythia-1b), S from 512 to 8192 with B * S = 16k tokens. Each configuration is
checked against SDPA (max relative error) before it is timed. Prints one markdown table; its rows go to
docs/benchmarks.md with the header lines. measure_rows() returns the same rows (benchmarks/gpu_check.py uses it).

    python kernels/benchmarks/bench_attention.py                       # bf16, causal, fwd and bwd
    python kernels/benchmarks/bench_attention.py --head_dims 128 --seqlens 2048 --modes fwd
"""

import argparse

import torch
import torch.nn.functional as F
from _common import header, print_table, require_cuda, time_ms

from gptneox import Config
from gptneox.ops import kernels

PRESET_FOR_HEAD_DIM = {64: "pythia-410m", 80: "pythia-2.8b", 128: "pythia-6.9b", 256: "pythia-1b"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sdpa_provider(backend_name: str | None):
    """SDPA pinned to one backend (torch.nn.attention.SDPBackend.<name>), or torch's own choice for None."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, causal):
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def triton_provider(q, k, v, causal):
    return kernels().attention(q, k, v, causal=causal)


PROVIDERS = {"triton": triton_provider, "sdpa-flash": sdpa_provider("FLASH_ATTENTION"),
             "sdpa-cudnn": sdpa_provider("CUDNN_ATTENTION"), "sdpa": sdpa_provider(None)}


def flops(B, nh, S, hs, causal, mode) -> float:
    f = 4 * B * nh * S * S * hs * (0.5 if causal else 1.0)
    return f * (2.5 if mode == "bwd" else 1.0)


def check(q, k, v, causal, baseline="sdpa-flash") -> float:
    """Max relative error of the kernel against SDPA (the baseline provider) on these inputs."""
    with torch.no_grad():
        out, ref = triton_provider(q, k, v, causal), PROVIDERS[baseline](q, k, v, causal)
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def measure(provider, q, k, v, causal, mode) -> float:
    if mode == "fwd":
        with torch.no_grad():
            return time_ms(lambda: provider(q, k, v, causal), device=q.device)
    o = provider(q, k, v, causal)
    do = torch.randn_like(o)
    return time_ms(lambda: o.backward(do, retain_graph=True), grad_to_none=[q, k, v], device=q.device)


def measure_rows(*, head_dims, seqlens, tokens, dtype, modes, causal, providers, heads=None, device="cuda",
                 log=print):
    """(columns, rows): TFLOP/s of every provider per (head dim, S, mode); the ratio is providers[0] / [1]."""
    rows = []
    for hs in head_dims:
        nh = heads or Config.from_name(PRESET_FOR_HEAD_DIM.get(hs, "pythia-6.9b")).num_attention_heads
        for S in seqlens:
            B = max(1, tokens // S)
            q, k, v = (torch.randn(B, nh, S, hs, device=device, dtype=DTYPES[dtype], requires_grad=True)
                       for _ in range(3))
            err = check(q, k, v, causal, baseline=providers[1] if len(providers) > 1 else "sdpa")
            for mode in modes:
                tflops = {p: flops(B, nh, S, hs, causal, mode) / measure(PROVIDERS[p], q, k, v, causal, mode) / 1e9
                          for p in providers}
                ratio = tflops[providers[0]] / tflops[providers[1]] if len(providers) > 1 else float("nan")
                rows.append([hs, S, B, nh, mode, *tflops.values(), ratio, f"{err:.1e}"])
                log(f"hd {hs} S {S} {mode}: " + ", ".join(f"{p} {t:.1f}" for p, t in tflops.items()))
            del q, k, v
    ratio_name = f"{providers[0]} / {providers[1]}" if len(providers) > 1 else "ratio"
    return ["hd", "S", "B", "nh", "mode", *providers, ratio_name, "max rel err"], rows


def main(*, head_dims, seqlens, tokens, dtype, modes, causal, providers):
    require_cuda()
    print(header())
    columns, rows = measure_rows(head_dims=head_dims, seqlens=seqlens, tokens=tokens, dtype=dtype, modes=modes,
                                 causal=causal, providers=providers, log=lambda line: print(line, flush=True))
    print(f"\nattention TFLOP/s, {dtype}, {'causal' if causal else 'non-causal'}, B*S = {tokens}")
    print_table(columns, rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head_dims", type=int, nargs="+", default=[64, 80, 128, 256], help="head sizes to time")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                        help="sequence lengths S (queries = keys)")
    parser.add_argument("--tokens", type=int, default=16384, help="B * S; the batch is tokens // S")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"],
                        help="forward, and/or backward (dq, dk, dv) alone")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                        help="causal attention (--no-causal for full)")
    parser.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=list(PROVIDERS)[:3],
                        help="implementations to time; 'triton' first gives the ratio column")
    main(**vars(parser.parse_args()))
