"""Decode attention (one new token per row against a KV cache) against torch SDPA, microseconds and GB/s.

A decode step reads the whole visible cache once: bytes = 2 (k and v) * B * nh * L * hs * element size; GB/s =
bytes / time, against the measured copy bandwidth. SDPA gets the same cache, sliced to the L visible slots (its
best case: no mask). Shapes: Pythia presets, batch 1 and 8, cache lengths 512 to 8192. The kernel's own split
count is used (two waves of programs over the SMs) unless --num_splits is given. measure_rows() returns the
table's rows (benchmarks/gpu_check.py uses it).

    python kernels/benchmarks/bench_decode.py
"""

import argparse

import torch
import torch.nn.functional as F
from _common import copy_bandwidth_gbs, header, print_table, require_cuda, time_ms

from gptneox import Config
from gptneox.ops import kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure_rows(*, presets, batches, cache_lens, dtype, num_splits, copy_gbs, device="cuda", log=print):
    """(columns, rows): one decode step per (preset, B, L), triton vs SDPA, checked against SDPA first."""
    rows = []
    for name in presets:
        c = Config.from_name(name)
        nh, hs = c.num_attention_heads, c.head_size
        for B in batches:
            for L in cache_lens:
                q = torch.randn(B, nh, 1, hs, device=device, dtype=DTYPES[dtype])
                k, v = (torch.randn(B, nh, L, hs, device=device, dtype=DTYPES[dtype]) for _ in range(2))
                offset = torch.full((B,), L - 1, device=device)
                triton_step = lambda: kernels().decode_attention(q, k, v, offset, num_splits=num_splits)  # noqa
                sdpa_step = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                with torch.no_grad():
                    out, ref = triton_step(), sdpa_step()
                    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    t_triton, t_sdpa = time_ms(triton_step, device=device), time_ms(sdpa_step, device=device)
                nbytes = 2 * k.numel() * k.element_size()
                rows.append([name, B, L, 1e3 * t_triton, 1e3 * t_sdpa, nbytes / t_triton / 1e6,
                             100 * nbytes / t_triton / 1e6 / copy_gbs, t_sdpa / t_triton, f"{err:.1e}"])
                log(f"{name} B {B} L {L}: triton {1e3 * t_triton:.1f} us, sdpa {1e3 * t_sdpa:.1f} us")
    columns = ["preset", "B", "L", "triton us", "sdpa us", "triton GB/s", "% of copy", "speedup", "max rel err"]
    return columns, rows


def main(*, presets, batches, cache_lens, dtype, num_splits):
    require_cuda()
    print(header())
    copy = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    columns, rows = measure_rows(presets=presets, batches=batches, cache_lens=cache_lens, dtype=dtype,
                                 num_splits=num_splits, copy_gbs=copy)
    print(f"\ndecode attention, {dtype}, one query per row")
    print_table(columns, rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["pythia-1.4b", "pythia-2.8b", "pythia-6.9b"],
                        help="Config presets whose heads and head size to use")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--cache_lens", type=int, nargs="+", default=[512, 2048, 8192], help="visible cache slots L")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q and cache dtype")
    parser.add_argument("--num_splits", type=int, default=None, help="split count (default: the kernel's choice)")
    main(**vars(parser.parse_args()))
