"""Fused partial rotary GB/s (forward and backward) against HF's eager rotary and the measured copy bandwidth.

Work: from the fused QKV output [B, T, nh * 3 * hs] produce q, k, v [B, nh, T, hs] with rotary on the first rot
dims of q and k. Bytes it must touch: read qkv once and write q, k, v once = 2 * B * T * 3 * C * element size
(positions and the rot/2 frequencies are noise); GB/s = those bytes / time, for every provider, so the ratio to
copy bandwidth is the fraction of the roofline. "hf-eager" is transformers' GPT-NeoX attention prologue (view,
transpose, chunk, cos/sin tables, apply_rotary_pos_emb); "torch" is gptneox.ops (the reference). Shapes: Pythia
presets at B * T = 16k tokens. Backward time is the backward pass alone (gradients of q, k, v into qkv).
measure_rows() returns the table's rows (benchmarks/gpu_check.py uses it).

    python kernels/benchmarks/bench_rotary.py
"""

import argparse

import torch
from _common import copy_bandwidth_gbs, header, print_table, require_cuda, time_ms

from gptneox import Config, ops
from gptneox.ops import kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_provider(qkv, pos, nh, rot, base):
    B, T, _ = qkv.shape
    hs = qkv.shape[-1] // (3 * nh)
    q, k, v = qkv.view(B, T, nh, 3 * hs).transpose(1, 2).chunk(3, dim=-1)  # each [B, nh, T, hs]
    cos, sin = ops.rotary_cos_sin(pos, rot, base)
    return ops.apply_rotary(q, cos, sin), ops.apply_rotary(k, cos, sin), v


def hf_provider(qkv, pos, nh, rot, base):
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb
    B, T, _ = qkv.shape
    hs = qkv.shape[-1] // (3 * nh)
    q, k, v = qkv.view(B, T, nh, 3 * hs).transpose(1, 2).chunk(3, dim=-1)
    cos, sin = ops.rotary_cos_sin(pos, rot, base)  # HF's GPTNeoXRotaryEmbedding output, [B, T, rot] in fp32
    q, k = apply_rotary_pos_emb(q, k, cos[:, 0].to(qkv.dtype), sin[:, 0].to(qkv.dtype))
    return q, k, v


def triton_provider(qkv, pos, nh, rot, base):
    return kernels().rotary(qkv, pos, nh, rot, base)


PROVIDERS = {"triton": triton_provider, "torch": torch_provider, "hf-eager": hf_provider}


def measure(provider, qkv, pos, nh, rot, base, mode) -> float:
    if mode == "fwd":
        with torch.no_grad():
            return time_ms(lambda: provider(qkv, pos, nh, rot, base), device=qkv.device)
    outs = provider(qkv, pos, nh, rot, base)
    grads = [torch.randn_like(o) for o in outs]
    return time_ms(lambda: torch.autograd.backward(outs, grads, retain_graph=True), grad_to_none=[qkv],
                   device=qkv.device)


def measure_rows(*, presets, tokens, seqlen, dtype, modes, copy_gbs, providers=tuple(PROVIDERS), device="cuda",
                 log=print):
    """(columns, rows): GB/s of every provider per (preset, mode), triton's fraction of the copy bandwidth and its
    ratio to the last provider (HF's eager rotary by default)."""
    rows = []
    for name in presets:
        c = Config.from_name(name)
        nh, rot, base = c.num_attention_heads, c.rotary_ndims, c.rotary_emb_base
        B = max(1, tokens // seqlen)
        qkv = torch.randn(B, seqlen, 3 * c.hidden_size, device=device, dtype=DTYPES[dtype], requires_grad=True)
        pos = torch.arange(seqlen, device=device).expand(B, seqlen)
        nbytes = 2 * qkv.numel() * qkv.element_size()
        for mode in modes:
            gbs = {p: nbytes / measure(PROVIDERS[p], qkv, pos, nh, rot, base, mode) / 1e6 for p in providers}
            rows.append([name, c.head_size, rot, mode, *gbs.values(), 100 * gbs["triton"] / copy_gbs,
                         gbs["triton"] / gbs[providers[-1]]])
            log(f"{name} {mode}: " + ", ".join(f"{p} {g:.1f} GB/s" for p, g in gbs.items()))
    return ["preset", "hs", "rot", "mode", *providers, "triton % of copy", f"triton / {providers[-1]}"], rows


def main(*, presets, tokens, seqlen, dtype, modes):
    require_cuda()
    print(header())
    copy = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s")
    columns, rows = measure_rows(presets=presets, tokens=tokens, seqlen=seqlen, dtype=dtype, modes=modes,
                                 copy_gbs=copy)
    print(f"\nrotary GB/s, {dtype}, B*T = {tokens}, T = {seqlen}")
    print_table(columns, rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["pythia-1.4b", "pythia-2.8b", "pythia-6.9b", "pythia-12b"],
                        help="Config presets whose head size, rotary dims and width to use")
    parser.add_argument("--tokens", type=int, default=16384, help="B * T")
    parser.add_argument("--seqlen", type=int, default=2048, help="T; the batch is tokens // T")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="qkv dtype")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"], help="passes to time")
    main(**vars(parser.parse_args()))
