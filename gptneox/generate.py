"""Text generation: prefill a static KV cache, then decode one token at a time, with the usual sampling controls.

    generate(model, input_ids, max_new_tokens=..., temperature=0)   greedy, token for token HF's generate
    stream(model, tokenizer, ids, ...)                              the same loop, yielding text as it is produced

Logits pass through, in HF's order: repetition penalty, temperature, top-k, top-p; then a token is drawn (argmax
when temperature is 0). Prompts of different lengths are left-padded; each row gets rotary positions counted from
its own first real token and stops on its own (eos, the Dolly end token, or a stop string). Facts about Dolly's
stopping rule: ../shared/docs/neox-spec.md section 7.3. Shapes: B batch, T prompt length, V vocab, N new tokens.
"""

import weakref
from collections.abc import Iterator, Sequence

import torch

NEG_INF = float("-inf")
_CACHES = weakref.WeakKeyDictionary()  # model -> (key, list[KVCache]): reused across calls, so compile sees one cache
_COMPILED = {}  # "step" -> the torch.compile'd decode step, built once per process


# ------------------------------------------------------------------------------------------ logits processors
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, as HF applies it): logits [B, V] of tokens already seen (bool [B, V])
    are divided by penalty when positive and multiplied by it when negative."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row [B, V] (ties with the k-th kept), set the rest to -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float, candidates: int = 256) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most probable tokens whose probability
    sums to at least p; a token is kept iff the tokens ranked strictly above it sum to less than p.

    Only the nucleus needs ranking: the top `candidates` tokens are ranked first (a top-256 of 50k logits took
    0.2 ms on a 2-core CPU, a full sort 4-60 ms) and the search widens until they hold mass p in every row.
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


# ----------------------------------------------------------------------------------------------------- inputs
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] and attention_mask [B, T] (1 = real token) for prompts of different lengths, padded left."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to start from")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def check_sampling(max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=None) -> None:
    """Raise ValueError naming the setting that is out of range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0 or None = off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if repetition_penalty is not None and not 0 < repetition_penalty < float("inf"):
        raise ValueError(f"repetition_penalty must be a positive number (1 = off), got {repetition_penalty!r}")


def _check_inputs(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    c = model.config
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {list(input_ids.shape)}")
    if input_ids.min() < 0 or input_ids.max() >= c.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {c.vocab_size}), found {input_ids.min()}..{input_ids.max()}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids "
                             f"{list(input_ids.shape)}")
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError("attention_mask must be left padding (0s then 1s in every row); right padding would "
                             "put the new tokens after the pads")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("a row of attention_mask is all padding: that prompt is empty")
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    T, limit = input_ids.shape[1], c.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt of {T} tokens + max_new_tokens {max_new_tokens} = {T + max_new_tokens} exceeds the "
                         f"context window of {limit} tokens" + (f"; at most {limit - T} new tokens fit" if T < limit
                                                               else "; shorten the prompt"))


def stop_ids(model, eos_token_id=None, tokenizer=None) -> list[int]:
    """The token ids that end a row: eos_token_id if given, else the config's eos plus Dolly's "### End" when the
    tokenizer carries it (Dolly's pipeline stops on that token, spec 7.3)."""
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    ids = list(model.config.eos_token_ids)
    if tokenizer is not None and tokenizer.end_key_id is not None and tokenizer.end_key_id not in ids:
        ids.append(tokenizer.end_key_id)
    return ids


# ------------------------------------------------------------------------------------------------------ cache
def _cache(model, B, max_len, dtype, device):
    """The model's static cache for this shape, reused across calls. Slots are never cleared: prefill rewrites
    0..T-1 and the causal mask hides every slot beyond the current position."""
    key = (B, max_len, dtype, device)
    held = _CACHES.get(model)
    if held is None or held[0] != key:
        _CACHES.pop(model, None)  # free the old one before allocating
        held = (key, model.new_cache(B, max_len, dtype=dtype, device=device))
        _CACHES[model] = held
    return held[1]


def _prefill(model, input_ids, position_ids, attention_mask, cache):
    """fp32 logits [B, V] of the last prompt position, after writing all T prompt positions into the cache."""
    input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    logits = model(input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                   input_pos=input_pos, logits_to_keep=1)  # the head projects the last position alone
    return logits[:, -1].float()


def _decode_step(model, x, input_pos, position_ids, attention_mask, cache):
    """Logits [B, V] in fp32 for one new token per row, x [B, 1], written at cache slot input_pos [1]."""
    logits = model(x, position_ids=position_ids, attention_mask=attention_mask, cache=cache, input_pos=input_pos)
    return logits[:, -1].float()


def _compiled_step(device):
    """The decode step under torch.compile, built once per process (CUDA graphs on GPU: mode reduce-overhead)."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_decode_step, mode=mode, fullgraph=True)
    return _COMPILED[mode]


# ------------------------------------------------------------------------------------------------- the loop
class Generation:
    """The state of one generate call: tokens [B, N] and logprobs [B, N] filled up to n, done [B]."""

    def __init__(self, B, N, device, pad_id):
        self.tokens = torch.full((B, N), pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(B, N, dtype=torch.float32, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.n = 0


@torch.no_grad()
def generate_steps(model, input_ids, *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                   attention_mask=None, eos_token_id=None, pad_token_id: int | None = None,
                   stop_strings: Sequence[str] = (), tokenizer=None, compile: bool = False) -> Iterator[Generation]:
    """The generation loop as an iterator: yields the Generation state after every new token. See generate()."""
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is computed for a list of prompts; pass it only with a tensor")
        input_ids, attention_mask = left_pad(input_ids, 0, device=model.embed_out.weight.device)
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to decode the generated text")
    device, dtype = model.embed_out.weight.device, model.embed_out.weight.dtype
    if torch.is_autocast_enabled(device.type):  # under autocast k and v come out in its dtype: cache them so
        dtype = torch.get_autocast_dtype(device.type)
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    ends = torch.tensor(stop_ids(model, eos_token_id, tokenizer), dtype=torch.long, device=device)
    pad_id = pad_token_id if pad_token_id is not None else (int(ends[0]) if len(ends) else 0)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    max_len = model.config.max_position_embeddings if compile else T + max_new_tokens  # compile: one static shape
    cache = _cache(model, B, max_len, dtype, device)
    state = Generation(B, max_new_tokens, device, pad_id)

    # prefill: every prompt token at slots 0..T-1; rotary positions count from each row's first real token
    if attention_mask is None or bool(attention_mask.all()):
        slot_mask, position_ids, lengths = None, None, torch.full((B,), T, device=device)
    else:
        attention_mask = attention_mask.to(device)
        slot_mask = torch.ones(B, max_len, dtype=torch.long, device=device)  # [B, max_len], 0 on the pads
        slot_mask[:, :T] = attention_mask
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # [B, T]
        lengths = attention_mask.sum(-1)  # [B] real prompt tokens
    seen = None
    if repetition_penalty is not None and repetition_penalty != 1.0:
        V = model.config.vocab_size
        seen_all = torch.zeros(B, V + 1, dtype=torch.bool, device=device)  # column V collects the pads, unused
        prompt = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask.to(device) == 0, V)
        seen = seen_all.scatter_(1, prompt, True)[:, :V]  # [B, V] view, updated in place below
    logits = _prefill(model, input_ids, position_ids, slot_mask, cache)  # [B, V]

    step = _compiled_step(device) if compile else _decode_step
    input_pos = torch.tensor([T], device=device)  # [1], advanced in place
    # [B, 1] rotary position of each row's next token, advanced in place; None: the slot index (no padding)
    position_ids = None if slot_mask is None else lengths.view(B, 1).clone()
    stop_strings = list(stop_strings)
    for i in range(max_new_tokens):
        scores = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seen=seen)
        token = sample(scores, temperature, generator)  # [B]
        token = torch.where(state.done, pad_id, token)  # rows already stopped emit padding (as HF does)
        state.tokens[:, i] = token
        state.logprobs[:, i] = torch.where(state.done, 0.0, logits.log_softmax(-1).gather(1, token[:, None])[:, 0])
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        state.done |= torch.isin(token, ends)
        state.n = i + 1
        if stop_strings:
            _check_stop_strings(state, tokenizer, stop_strings, ends)
        yield state
        if i + 1 == max_new_tokens or bool(state.done.all()):
            return
        logits = step(model, token[:, None], input_pos, position_ids, slot_mask, cache)
        input_pos += 1
        if position_ids is not None:
            position_ids += 1


def _check_stop_strings(state, tokenizer, stop_strings, ends):
    for b in torch.nonzero(~state.done).flatten().tolist():
        text = tokenizer.decode(state.tokens[b, :state.n].tolist())
        if any(s in text for s in stop_strings):
            state.done[b] = True


def generate(model, input_ids, *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
             attention_mask=None, eos_token_id=None, pad_token_id: int | None = None,
             stop_strings: Sequence[str] = (), tokenizer=None, return_logprobs: bool = False, compile: bool = False):
    """New token ids [B, N] for prompts input_ids: a tensor [B, T] (left-padded, with attention_mask) or a list of
    id lists of any lengths (left-padded here). N <= max_new_tokens: the loop ends when every row has stopped.

    temperature: 0 = greedy (argmax), else softmax(logits / temperature); top_k: keep the k most likely (0 or None:
    off); top_p: nucleus mass (None or 1: off); repetition_penalty: CTRL's penalty over prompt and generated tokens
    (None or 1: off); seed: a private torch.Generator for reproducible draws (None: torch's global RNG).
    Stopping: a row ends on a token of eos_token_id (int or list; default: config eos, plus Dolly's "### End" when
    tokenizer is Dolly's) or when its decoded text contains a stop string (needs tokenizer); the stopping token is
    kept and later slots hold pad_token_id (default: the first stop id), as in HF's generate.
    return_logprobs: also return logprobs [B, N], the model's log-probability (log_softmax of the raw logits, before
    any processing) of each chosen token, 0 on padding.
    compile: run the decode step under torch.compile (CUDA graphs on GPU); the cache then spans the whole context
    window so that every call has the same shapes and compiles only once.
    """
    steps = generate_steps(model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, attention_mask=attention_mask,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_strings=stop_strings,
                           tokenizer=tokenizer, compile=compile)
    state = None
    for state in steps:  # run to the end; the last state holds the result
        pass
    tokens = state.tokens[:, :state.n]
    return (tokens, state.logprobs[:, :state.n]) if return_logprobs else tokens


# ------------------------------------------------------------------------------------------------------- text
def completion_text(tokenizer, tokens, stop_token_ids=(), stop_strings: Sequence[str] = ()) -> str:
    """The text of one row of generated ids [N]: up to (not including) the first stop token, cut before the first
    stop string."""
    tokens = [int(t) for t in tokens]
    ends = set(stop_token_ids)
    cut = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
    text = tokenizer.decode(tokens[:cut])
    return _cut_at_stop(text, stop_strings)


def _cut_at_stop(text, stop_strings):
    hits = [text.find(s) for s in stop_strings if s in text]
    return text[:min(hits)] if hits else text


def _held_back(text, stop_strings) -> int:
    """How many trailing characters to withhold from a stream: an unfinished UTF-8 character (decoded as U+FFFD)
    or the start of a stop string that the next token may complete."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class TextStream:
    """Turns one row of generated ids, as it grows, into new text pieces that never end inside a multi-byte
    character or a possible stop string. The pieces join to completion_text() of the final ids."""

    def __init__(self, tokenizer, stop_token_ids=(), stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_token_ids, self.stop_strings = tokenizer, list(stop_token_ids), list(stop_strings)
        self.text, self.sent = "", 0

    def update(self, tokens, final: bool = False) -> str:
        """The text not yet returned, for the row's ids so far [N]; final: the row is complete, hold nothing back."""
        self.text = completion_text(self.tokenizer, tokens, self.stop_token_ids, self.stop_strings)
        ready = len(self.text) if final else len(self.text) - _held_back(self.text, self.stop_strings)
        piece = self.text[self.sent:ready]
        self.sent = max(self.sent, ready)
        return piece


def stream(model, tokenizer, input_ids, **kwargs) -> Iterator[str]:
    """Yield the generated text of one prompt (a list of ids, or a [1, T] tensor) piece by piece, as tokens arrive.

    A piece never ends inside a multi-byte character nor inside a possible stop string; the stop token and stop
    string are not part of the text. The pieces join to completion_text() of generate()'s tokens. Keyword
    arguments are generate()'s (return_logprobs excepted).
    """
    if isinstance(input_ids, torch.Tensor) and (input_ids.dim() != 2 or input_ids.shape[0] != 1):
        raise ValueError(f"stream() takes one prompt [1, T], got shape {list(input_ids.shape)}")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = [list(input_ids)]
    text = TextStream(tokenizer, stop_ids(model, kwargs.get("eos_token_id"), tokenizer), kwargs.get("stop_strings", ()))
    for state in generate_steps(model, input_ids, tokenizer=tokenizer, **kwargs):
        piece = text.update(state.tokens[0, :state.n].tolist(), final=bool(state.done[0]))
        if piece:
            yield piece
    piece = text.update(state.tokens[0, :state.n].tolist(), final=True)
    if piece:
        yield piece
