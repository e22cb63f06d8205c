"""What int8 / int4 cost in quality, on a model that has been trained: the numbers of docs/quantization.md.

    python benchmarks/bench_quantize_quality.py                 # ~5 minutes on 2 CPU cores

Trains a small byte-level GPT-NeoX (vocab 256, C = 256, 4 layers) on this repository's own documentation, the last
10% of it held out, then quantizes it as int8 and as int4 at group sizes 32, 64, 128 and 256 (and some of them with
int8 activations, quantize_activations) and reports for each:
the relative error of the weights (||W - deq(W)|| / ||W||, Frobenius, over every quantized linear), the relative
error of the logits on held-out text (Frobenius, and max |diff| / max |ref| as tests/tolerances.py's rel_err), the
held-out perplexity (per byte, over 6144 held-out bytes, 32 at a time against a cache: a decode-sized forward, which
is where quantize_activations applies), and the fraction of greedy continuations (--prompts
prompts of 32 held-out bytes, --new-tokens each) identical to the unquantized model's, with the mean length of the
agreeing prefix. fp32, CPU.
"""

import argparse
import copy
import math
import time
from pathlib import Path

import torch

from gptneox import Config, GPTNeoX, QuantizedLinear, causal_lm_loss, quantize
from gptneox.quant import quantize_activations

ROOT = Path(__file__).resolve().parents[1]
# C = 256 and 4C = 1024: every group size divides K, so each scheme is measured as it is, with no short group
SHAPE = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
             max_position_embeddings=256)
SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256),  # (mode, group, activations)
           ("int8", None, "int8"), ("int4", 32, "int8"), ("int4", 128, "int8")]  # + quantize_activations


def corpus(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte ids of root's README.md and docs/*.md: 90% / 10%."""
    text = b"\n".join(p.read_bytes() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def train(data: torch.Tensor, steps: int, T: int = 128, B: int = 16) -> GPTNeoX:
    torch.manual_seed(0)
    model = GPTNeoX(Config(**SHAPE))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))  # warm-up, cosine
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - T, (B,))
        batch = torch.stack([data[s:s + T] for s in starts])  # [B, T]
        loss = causal_lm_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f}", flush=True)
    return model.eval()


def weight_error(ref: GPTNeoX, q: GPTNeoX) -> float:
    num = den = 0.0
    for name, m in q.named_modules():
        if isinstance(m, QuantizedLinear):
            w = ref.get_submodule(name).weight
            num += (m.dequantize() - w).pow(2).sum().item()
            den += w.pow(2).sum().item()
    return math.sqrt(num / den)


def chunked(model: GPTNeoX, ids: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """The logits of ids [1, T], computed chunk tokens at a time against a KV cache: what a decode-sized forward
    computes (the same numbers as one forward, weight-only; with quantized activations, the kernel a decode step
    runs, which forwards of more than 48 rows do not take)."""
    cache, T = model.new_cache(1, ids.shape[1]), ids.shape[1]
    return torch.cat([model(ids[:, t:t + chunk], cache=cache, input_pos=torch.arange(t, min(t + chunk, T)))
                      for t in range(0, T, chunk)], dim=1)


@torch.no_grad()
def evaluate(ref: GPTNeoX, model: GPTNeoX, held: torch.Tensor, prompts: int, new_tokens: int) -> dict:
    T = 128
    windows = held[: (len(held) // T) * T].view(-1, T)[:48]  # [48, T], consecutive held-out windows (6144 bytes)
    loss = logits_fro = logits_max = 0.0
    for batch in windows.split(1):
        a, b = chunked(model, batch), chunked(ref, batch)
        loss += causal_lm_loss(a, batch, reduction="sum").item()
        logits_fro = max(logits_fro, ((a - b).norm() / b.norm()).item())
        logits_max = max(logits_max, ((a - b).abs().max() / b.abs().max()).item())
    ppl = math.exp(loss / (windows.numel() - windows.shape[0]))
    starts = torch.linspace(0, len(held) - 64, prompts).long()
    same, prefix = 0, 0
    for s in starts:
        prompt = held[s:s + 32][None]  # [1, 32]
        x = model.generate(prompt, max_new_tokens=new_tokens, temperature=0, eos_token_id=[])
        y = ref.generate(prompt, max_new_tokens=new_tokens, temperature=0, eos_token_id=[])
        same += bool(torch.equal(x, y))
        prefix += int((x == y).long().cumprod(-1).sum())
    return dict(ppl=ppl, logits_fro=logits_fro, logits_max=logits_max, same=same / prompts, prefix=prefix / prompts)


def main(*, steps, prompts, new_tokens, threads, schemes, corpus_root):
    torch.set_num_threads(threads)
    train_ids, held = corpus(Path(corpus_root))
    print(f"corpus: {len(train_ids)} training bytes, {len(held)} held out; training {steps} steps")
    t0 = time.perf_counter()
    ref = train(train_ids, steps)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    base = evaluate(ref, ref, held, prompts, new_tokens)
    print(f"| scheme | weight rel. error | logits rel. error (Frobenius / max) | held-out ppl | identical greedy "
          f"continuations ({prompts} x {new_tokens} tokens) | mean agreeing prefix |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| fp32 | 0 | 0 / 0 | {base['ppl']:.3f} | 100% | {new_tokens:.1f} |")
    for mode, g, *acts in SCHEMES:
        key = (mode if g is None else f"{mode}-g{g}") + ("-a8" if acts else "")
        if schemes and key not in schemes:
            continue
        q = quantize(copy.deepcopy(ref), mode, group_size=g or 128)
        if acts:
            quantize_activations(q, *acts)
        r = evaluate(ref, q, held, prompts, new_tokens)
        name = (mode if g is None else f"{mode} g{g}") + (", int8 activations" if acts else "")
        print(f"| {name} | {weight_error(ref, q):.4f} | {r['logits_fro']:.4f} / {r['logits_max']:.4f} | "
              f"{r['ppl']:.3f} | {r['same']:.0%} | {r['prefix']:.1f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps of 16 x 128 bytes (default 300)")
    p.add_argument("--prompts", type=int, default=20, help="greedy continuations compared (default 20)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per continuation (default 32)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--corpus-root", default=str(ROOT), help="the directory whose README.md and docs/*.md are the "
                   "text (default: this checkout; the docs change, so a row names the commit it read, e.g. "
                   "`git archive COMMIT README.md docs | tar -x -C DIR`)")
    p.add_argument("--schemes", nargs="*", help="only these rows: int8, int4-g32, int4-g64, int4-g128, int4-g256, "
                   "int8-a8, int4-g32-a8, int4-g128-a8 (-a8: quantize_activations) "
                   "(the training is seeded: the same model every run on the same thread count)")
    main(**vars(p.parse_args()))
