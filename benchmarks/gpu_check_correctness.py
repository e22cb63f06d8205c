"""gpu_check's correctness section: the kernels at large shapes, with the launch configs autotuning picks.

The rule is the project's (tests/tolerances.py): in bf16, max |ours - ref| <= 2 x max |SDPA in bf16 - ref| +
rounding, with ref the same attention in fp32 (torch math, written out here; unchunked: its largest temporary,
the [2, 16, 2048, 2048] fp32 scores, is 512 MB); fp32 uses assert_close defaults (the CPU --tiny run: fp32,
and fp16 under the 2x rule for one head dim). Cases: causal attention forward and backward at B=2, nh=16,
T=S=2048 for head dims 64/80/128/256; a left-padded cached batch (chunked prefill and a decode step, per-row
q_offset and k_start); and a KV cache past 2**31 elements (rotary writing into it, decode and attention forward +
backward over it) to catch int32 offset overflow. Each case records its max errors and, for attention, the
configs the autotuner chose.
"""

import math

import torch
import torch.nn.functional as F
from tolerances import assert_within_2x

from gptneox.ops.runtime import kernels

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
BIG_L = 2**20 + 2**17  # cache slots: [1, 16, BIG_L, 128] = 2.4e9 elements (4.8 GB in bf16), the last heads past 2**31


def dense_mask(T, S, q_offset, k_start):
    """bool [B, 1, T, S] as kernels/attention.py defines it: query i of row b at slot q_offset[b] + i sees keys
    k_start[b] <= j <= its slot, and always its own slot."""
    slots = torch.arange(S, device=q_offset.device)
    qpos = q_offset[:, None] + torch.arange(T, device=q_offset.device)  # [B, T]
    keep = (slots >= k_start[:, None, None]) & (slots <= qpos[..., None])  # [B, T, S]
    return (keep | (slots == qpos[..., None]))[:, None]


def math_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hs), masked) v, every op written out (the fp32 reference)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, nh, T, S]
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def judge(out, base, ref) -> tuple[float, float, str]:
    """(our max error, the baseline's, status) under the tolerance table's kernel row."""
    err = (out.float() - ref.float()).abs().max().item()
    base_err = (base.float() - ref.float()).abs().max().item()
    try:
        if out.dtype == torch.float32:
            torch.testing.assert_close(out, ref.to(out.dtype))
        else:
            assert_within_2x(out, base, ref)
        return err, base_err, "ok"
    except AssertionError as e:
        return err, base_err, f"fail: {str(e)[:300]}"


def fwd_bwd(fn, inputs, do, dtype):
    """[o, dq, dk, dv] of fn on copies of the fp32 inputs in dtype, one shared upstream gradient."""
    x = [t.to(dtype).detach().requires_grad_() for t in inputs]
    o = fn(*x)
    o.backward(do.to(dtype))
    return [o.detach(), *(t.grad for t in x)]


def record(rec, case, dtype_name, outs, bases, refs, names, base_name="SDPA", **extra):
    """One item: our max errors and the baseline's (SDPA in the same dtype) against the fp32 reference."""
    results = [judge(o, b, r) for o, b, r in zip(outs, bases, refs)]
    bad = [f"{n}: {s}" for n, (_, _, s) in zip(names, results) if s != "ok"]
    rec.add(case, dtype_name, "max err " + "/".join(names) + ": " + "/".join(f"{e:.1e}" for e, _, _ in results),
            f"{base_name} " + "/".join(f"{b:.1e}" for _, b, _ in results), status="; ".join(bad) if bad else "ok",
            errors={n: e for n, (e, _, _) in zip(names, results)},
            baseline_errors={n: b for n, (_, b, _) in zip(names, results)}, **extra)


def attention_large(rec, ctx, cases):
    """Causal attention forward and backward, T = S, for each (head dim, dtype) of cases."""
    B, nh, T = (2, 16, 2048) if ctx.cuda else (1, 2, 40)
    for hs, dtype in cases:
        x32 = [torch.randn(B, nh, T, hs, device=ctx.device) for _ in range(3)]
        do = torch.randn(B, nh, T, hs, device=ctx.device)
        mask = dense_mask(T, T, torch.zeros(B, dtype=torch.long, device=ctx.device),
                          torch.zeros(B, dtype=torch.long, device=ctx.device))
        ref = fwd_bwd(lambda q, k, v: math_attention(q, k, v, mask), x32, do, torch.float32)
        base = fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), x32, do, dtype)
        ours = fwd_bwd(lambda q, k, v: kernels().attention(q, k, v, causal=True), x32, do, dtype)
        record(rec, f"attention fwd+bwd causal hd {hs} B {B} nh {nh} T=S={T}", DTYPE_NAMES[dtype],
               ours, base, ref, ["o", "dq", "dk", "dv"], configs=kernels().best_configs())
        del x32, do, ref, base, ours


def left_padded_cache(rec, ctx):
    """A batch of two rows in a cache of L slots: row 0 fills it, row 1 is left-padded and shorter."""
    nh, hs, L, T = (16, 128, 4096, 512) if ctx.cuda else (2, 32, 96, 16)  # hd 128: configs tuned already
    dev = ctx.device
    q_offset = torch.tensor([L - T, L // 4], device=dev)  # slot of each row's first new query
    k_start = torch.tensor([0, L // 6], device=dev)  # left padding of row 1
    k32, v32 = (torch.randn(2, nh, L, hs, device=dev) for _ in range(2))
    q32, do = (torch.randn(2, nh, T, hs, device=dev) for _ in range(2))
    mask = dense_mask(T, L, q_offset, k_start)
    ref = fwd_bwd(lambda q, k, v: math_attention(q, k, v, mask), [q32, k32, v32], do, torch.float32)
    base = fwd_bwd(lambda q, k, v: sdpa(q, k, v, mask), [q32, k32, v32], do, ctx.dtype)
    ours = fwd_bwd(lambda q, k, v: kernels().attention(q, k, v, q_offset=q_offset, k_start=k_start),
                   [q32, k32, v32], do, ctx.dtype)
    record(rec, f"cached prefill, left-padded: q_offset {q_offset.tolist()}, k_start {k_start.tolist()}, "
                f"T {T}, L {L}, hd {hs}", ctx.dtype_name, ours, base, ref, ["o", "dq", "dk", "dv"])
    q_offset = q_offset + T - 1  # one decode step after each row's chunk
    mask = dense_mask(1, L, q_offset, k_start)
    q, k, v = (t.to(ctx.dtype) for t in (q32[:, :, -1:], k32, v32))
    with torch.no_grad():
        ref = math_attention(q32[:, :, -1:], k32, v32, mask)
        base = sdpa(q, k, v, mask)
        out = kernels().decode_attention(q, k, v, q_offset, k_start)
    record(rec, f"decode step, left-padded: q_offset {q_offset.tolist()}, k_start {k_start.tolist()}, L {L}",
           ctx.dtype_name, [out], [base], [ref], ["o"])


def rotary_reference(x, pos, rot, base):
    """x [B, nh, T, hs] with rotate-half on its first rot dims at integer positions pos [T], in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, device=x.device).float() / rot))  # [rot / 2]
    angles = pos.float()[:, None] * inv_freq  # [T, rot / 2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    xr = x[..., :rot].float()
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat([xr * cos + torch.cat([-x2, x1], -1) * sin, x[..., rot:].float()], dim=-1)


def past_2_31(rec, ctx):
    """Rotary into, decode over and attention (fwd + bwd) over a KV cache of more than 2**31 elements; only the
    last W slots are visible (k_start), so the fp32 reference needs just that window."""
    nh, hs, L, W, T, rot = (16, 128, BIG_L, 4096, 64, 32) if ctx.cuda else (2, 32, 160, 48, 8, 8)
    dev, dt = ctx.device, ctx.dtype
    k_cache, v_cache = (torch.randn(1, nh, L, hs, device=dev, dtype=dt) for _ in range(2))
    size = f"cache [1, {nh}, {L}, {hs}] = {k_cache.numel():.3g} elements"
    qkv = torch.randn(1, 4, nh * 3 * hs, device=dev, dtype=dt)  # four new tokens at the last slots
    pos = torch.arange(L - 4, L, device=dev)
    with torch.no_grad():
        kernels().rotary(qkv, pos, nh, rot, 10000.0, k_cache=k_cache, v_cache=v_cache, input_pos=pos)
    k_new = qkv.view(1, 4, nh, 3 * hs).transpose(1, 2)[..., hs:2 * hs]  # [1, nh, 4, hs]
    ref = rotary_reference(k_new, pos, rot, 10000.0)
    record(rec, f"rotary into the cache's last slots, {size}", ctx.dtype_name,
           [k_cache[:, :, L - 4:]], [ref.to(dt)], [ref], ["k"], base_name="the reference rounded:")
    window = slice(L - W, L)
    k32, v32 = k_cache[:, :, window].float(), v_cache[:, :, window].float()
    q32 = torch.randn(1, nh, T, hs, device=dev)
    with torch.no_grad():
        one = torch.ones(1, 1, 1, W, dtype=torch.bool, device=dev)
        out = kernels().decode_attention(q32[:, :, -1:].to(dt), k_cache, v_cache, L - 1, L - W)
        record(rec, f"decode over the cache, k_start {L - W}, {size}", ctx.dtype_name, [out],
               [sdpa(q32[:, :, -1:].to(dt), k32.to(dt), v32.to(dt), one)],
               [math_attention(q32[:, :, -1:], k32, v32, one)], ["o"])
    do = torch.randn(1, nh, T, hs, device=dev)
    mask = dense_mask(T, W, torch.tensor([W - T], device=dev), torch.tensor([0], device=dev))
    ref = fwd_bwd(lambda q, k, v: math_attention(q, k, v, mask), [q32, k32, v32], do, torch.float32)
    base = fwd_bwd(lambda q, k, v: sdpa(q, k, v, mask), [q32, k32, v32], do, dt)
    q = q32.to(dt).requires_grad_()
    k_cache.requires_grad_()
    v_cache.requires_grad_()
    o = kernels().attention(q, k_cache, v_cache, q_offset=L - T, k_start=L - W)
    o.backward(do.to(dt))
    hidden = max(k_cache.grad[:, :, :L - W].abs().max().item(), v_cache.grad[:, :, :L - W].abs().max().item())
    ours = [o.detach(), q.grad, k_cache.grad[:, :, window], v_cache.grad[:, :, window]]
    record(rec, f"attention fwd+bwd over the cache, T {T}, k_start {L - W}, {size}", ctx.dtype_name, ours, base, ref,
           ["o", "dq", "dk", "dv"], hidden_key_grad_max=hidden)
    if hidden != 0:
        rec.add("gradient of the hidden keys", ctx.dtype_name, f"max |dk|, |dv| = {hidden}", status="fail: not zero")


def run_all(rec, ctx):
    """hd 128 first (it tunes the configs the cached and 2**31 cases reuse), then those cases, then the other head
    dims: if the budget runs out, what is lost is the least informative."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is exact fp32
    torch.backends.cudnn.allow_tf32 = False
    if ctx.cuda:
        first, others = [(128, ctx.dtype)], [(hs, ctx.dtype) for hs in (64, 80, 256)]
    else:  # fp32 (assert_close) and fp16 (the 2x rule) under the interpreter
        first, others = [(32, torch.float32)], [(80, torch.float16)]
    for case in (lambda: attention_large(rec, ctx, first), lambda: left_padded_cache(rec, ctx),
                 lambda: past_2_31(rec, ctx), lambda: attention_large(rec, ctx, others)):
        case()
        if ctx.cuda:
            torch.cuda.empty_cache()
