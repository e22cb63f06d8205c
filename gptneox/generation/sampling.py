"""Sampling: the logits processors, in HF's order (repetition penalty, temperature, top-k, top-p), and the draw;
OpenAI's presence / frequency penalties (the server applies them, with logit_bias, before these).

Each function takes fp32 logits [B, V] (B rows, V vocabulary) and is written from its paper's definition; the tests
check them against those definitions and greedy generation against transformers' generate.
"""

import torch

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, as HF applies it): logits [B, V] of tokens already seen (bool [B, V])
    are divided by penalty when positive and multiplied by it when negative."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_openai_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float = 0.0,
                           frequency: float = 0.0) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: logits [B, V] minus counts * frequency + (counts > 0) * presence,
    counts [B, V] how often each token was generated so far (the prompt not counted, as vLLM counts)."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row [B, V] (ties with the k-th kept), set the rest to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float, candidates: int = 256) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most probable tokens whose probability
    sums to at least p; a token is kept iff the tokens ranked strictly above it sum to less than p.

    Only the nucleus needs ranking: the top `candidates` tokens are ranked first (a top-k is much cheaper than a
    full sort: docs/benchmarks.md, "Top-p candidates") and the search widens until they hold mass p in every row.
    """
    V = logits.shape[-1]
    if p >= 1.0:  # the nucleus is the whole vocabulary (fp32 rounding of the running sum must not cut the tail)
        return logits
    lse = logits.logsumexp(dim=-1, keepdim=True)  # [B, 1]
    k = min(candidates, V)
    while True:
        top, order = torch.topk(logits, k, dim=-1)  # [B, k], descending
        probs = (top - lse).exp()  # probabilities under the full softmax
        if k == V or bool((probs.sum(dim=-1) >= p).all()):
            break
        k = min(8 * k, V)
    above = probs.cumsum(dim=-1) - probs  # mass ranked strictly above each token; the top one always stays
    kept = top.masked_fill(above >= p, NEG_INF)
    return torch.full_like(logits, NEG_INF).scatter(-1, order, kept)


def process_logits(logits, *, temperature=1.0, top_k=None, top_p=None, repetition_penalty=None, seen=None):
    """fp32 logits [B, V] after the penalty, temperature (skipped at 0, greedy), top-k and top-p, in HF's order."""
    if repetition_penalty is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:  # None or 0 disable it (Dolly passes top_k=0)
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A token per row [B] from processed logits [B, V]: argmax at temperature 0, else a draw from softmax.

    The draw is argmax(probs / E) with E ~ Exp(1) i.i.d. (the exponential race), which picks i with probability
    probs[i] and, unlike torch.multinomial, needs no host sync, so it runs inside a CUDA graph.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def logprob_scores(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of token under logits [1, V] (raw: before any processing, as generate's logprobs), and
    the k most likely tokens with theirs."""
    logp = logits[0].log_softmax(-1)  # [V]
    top = torch.topk(logp, k) if k else None
    return float(logp[token]), ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
