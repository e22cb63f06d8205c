"""Text generation: prefill a static KV cache, then decode one token at a time, with the usual sampling controls.

    generate(model, prompts, max_new_tokens=20, temperature=0)      greedy, token for token HF's generate
    stream(model, tokenizer, prompt, max_new_tokens=20)             the same loop, yielding text as it is produced
    gen = Generator(model, compile=True); gen.generate(...)         the state both use, kept across calls

The settings are one validated frozen dataclass, GenerationConfig; every entry point takes one, or its fields as
keywords. A Generator owns what outlives a call: the static KV cache (reused while its shape fits) and, with
compile=True, the torch.compile'd decode step, so a held Generator compiles once. Prompts of different lengths are
left-padded; each row gets rotary positions counted from its own first real token and stops on its own (eos, the
Dolly end token, or a stop string). Logits are processed as gptneox.sampling describes. Facts about Dolly's stopping
rule: docs/architecture.md, "Dolly v2". Shapes: B batch, T prompt length, V vocab, N new tokens.
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch

from .sampling import process_logits, sample
from .streaming import TextStream


# ------------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class GenerationConfig:
    """How to generate (HF's GenerationConfig names). temperature 0 = greedy; top_k 0 / None and top_p 1 / None
    are off; repetition_penalty: CTRL's, over prompt and generated tokens (None or 1: off); seed: a private
    torch.Generator for reproducible draws (None: torch's global RNG); eos_token_id: the ids that end a row (None:
    the config's eos, plus Dolly's "### End" with a Dolly tokenizer; () for none); pad_token_id: what stopped rows
    emit (default: the first stop id); stop_strings: a row also ends when its text contains one (needs a tokenizer)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()
    num_draft_tokens: int = 4  # with a draft model: tokens it proposes per target forward (gptneox/speculative.py)

    def __post_init__(self):
        if isinstance(self.eos_token_id, (list, tuple)):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, Sequence):
            raise ValueError(f"stop_strings must be a list of strings, got {self.stop_strings!r}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        for problem in _problems(self):
            raise ValueError(problem)

    @classmethod
    def of(cls, config: "GenerationConfig | None" = None, **settings) -> "GenerationConfig":
        """config with settings replaced, or a new config of settings; unknown names raise a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown generation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if config is not None:
            return replace(config, **settings)
        if "max_new_tokens" not in settings:
            raise ValueError("max_new_tokens is required: how many tokens to generate at most")
        return cls(**settings)


def _problems(c: GenerationConfig) -> Iterator[str]:
    """The settings that are out of range, each named."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)
    if not is_int(c.max_new_tokens) or c.max_new_tokens < 1:
        yield f"max_new_tokens must be a positive integer, got {c.max_new_tokens!r}"
    if not isinstance(c.temperature, (int, float)) or not 0 <= c.temperature < math.inf:
        yield f"temperature must be a finite number >= 0 (0 = greedy), got {c.temperature!r}"
    if c.top_k is not None and (not is_int(c.top_k) or c.top_k < 0):
        yield f"top_k must be a non-negative integer (0 or None = off), got {c.top_k!r}"
    if c.top_p is not None and not 0 < c.top_p <= 1:
        yield f"top_p must be in (0, 1], got {c.top_p!r}"
    if c.repetition_penalty is not None and not 0 < c.repetition_penalty < math.inf:
        yield f"repetition_penalty must be a positive number (1 = off), got {c.repetition_penalty!r}"
    if c.seed is not None and not is_int(c.seed):
        yield f"seed must be an integer, got {c.seed!r}"
    ids = c.eos_token_id if isinstance(c.eos_token_id, tuple) else () if c.eos_token_id is None else (c.eos_token_id,)
    if not all(is_int(i) and i >= 0 for i in ids):
        yield f"eos_token_id must be a token id or a list of them, got {c.eos_token_id!r}"
    if c.pad_token_id is not None and (not is_int(c.pad_token_id) or c.pad_token_id < 0):
        yield f"pad_token_id must be a token id, got {c.pad_token_id!r}"
    if not all(isinstance(s, str) and s for s in c.stop_strings):
        yield f"stop_strings must be non-empty strings (an empty one would stop at once), got {list(c.stop_strings)!r}"
    if not is_int(c.num_draft_tokens) or c.num_draft_tokens < 1:
        yield f"num_draft_tokens must be a positive integer, got {c.num_draft_tokens!r}"


# ------------------------------------------------------------------------------------------------------- inputs
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] and attention_mask [B, T] (1 = real token) for prompts of different lengths, padded left."""
    if len(prompts) == 0:
        raise ValueError("no prompts: give at least one prompt (a list of token ids)")
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


def _check_inputs(model, input_ids, attention_mask, config: GenerationConfig, tokenizer):
    c = model.config
    if input_ids.dim() != 2 or 0 in input_ids.shape:
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
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to decode the generated text")
    T, N, limit = input_ids.shape[1], config.max_new_tokens, c.max_position_embeddings
    if T + N > limit:
        raise ValueError(f"prompt of {T} tokens + max_new_tokens {N} = {T + N} exceeds the context window of "
                         f"{limit} tokens" + (f"; at most {limit - T} new tokens fit" if T < limit
                                              else "; shorten the prompt"))


def stop_ids(model, eos_token_id=None, tokenizer=None) -> list[int]:
    """The token ids that end a row: eos_token_id if given, else the config's eos plus Dolly's "### End" when the
    tokenizer carries it (Dolly's pipeline stops on that token; docs/architecture.md, "Dolly v2")."""
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    ids = list(model.config.eos_token_ids)
    if tokenizer is not None and tokenizer.end_key_id is not None and tokenizer.end_key_id not in ids:
        ids.append(tokenizer.end_key_id)
    return ids


# -------------------------------------------------------------------------------------------- forward passes
def prefill(model, input_ids, position_ids, attention_mask, cache):
    """fp32 logits [B, V] of the last prompt position, after writing all T prompt positions into the cache."""
    input_pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    logits = model(input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                   input_pos=input_pos, logits_to_keep=1)  # the head projects the last position alone
    return logits[:, -1].float()


def decode_step(model, x, input_pos, position_ids, attention_mask, cache):
    """Logits [B, V] in fp32 for one new token per row, x [B, 1], written at cache slot input_pos [1]."""
    logits = model(x, position_ids=position_ids, attention_mask=attention_mask, cache=cache, input_pos=input_pos)
    return logits[:, -1].float()


class Generation:
    """The state of one generation: tokens [B, N] and logprobs [B, N] filled up to n, done [B], and lengths [B],
    each row's real new tokens (its stop token included, the padding after it not)."""

    def __init__(self, B, N, device, pad_id):
        self.tokens = torch.full((B, N), pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(B, N, dtype=torch.float32, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)
        self.n = 0


# ---------------------------------------------------------------------------------------------------- the loop
class Generator:
    """Generation with one model. It owns the static KV cache, reused across calls while the batch size and length
    fit (slots are never cleared: prefill rewrites 0..T-1 and the causal mask hides every slot beyond the current
    position), and with compile=True the decode step under torch.compile (CUDA graphs on GPU: mode
    reduce-overhead), whose cache then spans the whole context window so that every call has the same shapes.
    tokens_generated counts the real new tokens of every call (for tokens/s reports)."""

    def __init__(self, model, *, compile: bool = False, draft_model=None):
        self.model, self.compile, self.draft_model = model, compile, draft_model
        if draft_model is not None:
            from .speculative import check_draft
            check_draft(model, draft_model, compile)
        mode = "reduce-overhead" if model.gpt_neox.embed_in.weight.device.type == "cuda" else "default"
        self.step = torch.compile(decode_step, mode=mode, fullgraph=True) if compile else decode_step
        self.caches = {}  # "target" / "draft" -> (shape key, list[KVCache])
        self.tokens_generated = 0
        self.stats = None  # with a draft model: the speculative.Stats of every call so far

    @property
    def cache(self):
        """The model's KV cache (a list of KVCache, one per layer), or None before the first call."""
        return self.caches["target"][1] if "target" in self.caches else None

    def kv_cache(self, B: int, max_len: int, dtype, device, which: str = "target"):
        """The cache of `which` model for this shape: the one held, or a new one (the old one freed first)."""
        model = self.model if which == "target" else self.draft_model
        key = (B, max_len, dtype, device)
        if self.caches.get(which, (None,))[0] != key:
            self.caches.pop(which, None)
            self.caches[which] = (key, model.new_cache(B, max_len, dtype=dtype, device=device))
        return self.caches[which][1]

    @torch.no_grad()
    def steps(self, input_ids, config: GenerationConfig, *, attention_mask=None, tokenizer=None
              ) -> Iterator[Generation]:
        """The generation loop as an iterator: yields the Generation state after every new token (with a draft
        model, after every target forward, which may add several tokens to each row)."""
        if self.draft_model is None:
            run = _Run(self, input_ids, attention_mask, config, tokenizer)
        else:
            from .speculative import SpeculativeRun
            run = SpeculativeRun(self, input_ids, attention_mask, config, tokenizer)
        try:
            yield from run.loop()
        finally:
            self.tokens_generated += int(run.state.lengths.sum())

    def generate(self, input_ids, config: GenerationConfig | None = None, *, attention_mask=None, tokenizer=None,
                 return_logprobs: bool = False, return_stats: bool = False, **settings):
        """New token ids [B, N] (N <= max_new_tokens: the loop ends when every row has stopped) for prompts
        input_ids: a tensor [B, T] (left-padded, with attention_mask) or a list of id lists of any lengths.

        The stopping token is kept and later slots hold the pad id, as in HF's generate. return_logprobs: also
        return logprobs [B, N], the model's log-probability (log_softmax of the raw logits, before any processing)
        of each chosen token, 0 on padding. return_stats (with a draft model): also return this call's
        speculative.Stats (acceptance rate, tokens per target forward, draft and target time).
        settings: GenerationConfig fields, replacing config's.
        """
        state, before = None, self.stats
        for state in self.steps(input_ids, GenerationConfig.of(config, **settings), attention_mask=attention_mask,
                                tokenizer=tokenizer):
            pass  # run to the end; the last state holds the result
        out = [state.tokens[:, :state.n]]
        if return_logprobs:
            out.append(state.logprobs[:, :state.n])
        if return_stats:
            if self.draft_model is None:
                raise ValueError("return_stats reports speculative decoding: give the Generator a draft_model")
            out.append(self.stats.since(before))
        return out[0] if len(out) == 1 else tuple(out)

    def stream(self, tokenizer, input_ids, config: GenerationConfig | None = None, **settings) -> Iterator[str]:
        """Yield the generated text of one prompt (a list of ids, or a [1, T] tensor) piece by piece.

        A piece never ends inside a multi-byte character nor inside a possible stop string; the stop token and stop
        string are not part of the text. The pieces join to streaming.completion_text() of generate()'s tokens.
        """
        config = GenerationConfig.of(config, **settings)
        if isinstance(input_ids, torch.Tensor) and (input_ids.dim() != 2 or input_ids.shape[0] != 1):
            raise ValueError(f"stream() takes one prompt [1, T], got shape {list(input_ids.shape)}")
        prompts = input_ids if isinstance(input_ids, torch.Tensor) else [list(input_ids)]
        text = TextStream(tokenizer, stop_ids(self.model, config.eos_token_id, tokenizer), config.stop_strings)
        state = None
        for state in self.steps(prompts, config, tokenizer=tokenizer):
            piece = text.update(state.tokens[0, :state.n].tolist(), final=bool(state.done[0]))
            if piece:
                yield piece
        piece = text.update(state.tokens[0, :state.n].tolist(), final=True)
        if piece:
            yield piece


class _Run:
    """One call's tensors between steps: the cache, masks and positions, the repetition set, the RNG."""

    def __init__(self, gen: Generator, input_ids, attention_mask, config: GenerationConfig, tokenizer):
        model, self.gen, self.config, self.tokenizer = gen.model, gen, config, tokenizer
        device = model.gpt_neox.embed_in.weight.device
        if isinstance(input_ids, (list, tuple)):
            if attention_mask is not None:
                raise ValueError("attention_mask is computed for a list of prompts; pass it only with a tensor")
            input_ids, attention_mask = left_pad(input_ids, 0, device=device)
        _check_inputs(model, input_ids, attention_mask, config, tokenizer)
        self.input_ids = input_ids = input_ids.to(device)
        self.prompt_mask = attention_mask = None if attention_mask is None else attention_mask.to(device)  # [B, T]
        B, T = input_ids.shape
        self.ends = torch.tensor(stop_ids(model, config.eos_token_id, tokenizer), dtype=torch.long, device=device)
        self.pad_id = pad_id = (config.pad_token_id if config.pad_token_id is not None
                                else int(self.ends[0]) if len(self.ends) else 0)
        self.generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
        self.max_len = max_len = self.slots(T)
        self.cache = gen.kv_cache(B, max_len, _activation_dtype(model), device)
        self.state = Generation(B, config.max_new_tokens, device, pad_id)
        # rotary positions count from each row's first real token; the slot mask [B, max_len] is 0 on the pads
        self.slot_mask = self.position_ids = None
        if attention_mask is not None and not bool(attention_mask.all()):
            self.slot_mask = torch.ones(B, max_len, dtype=torch.long, device=device)
            self.slot_mask[:, :T] = attention_mask
            self.position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # [B, T]
        self.seen = self._seen(attention_mask) if config.repetition_penalty not in (None, 1.0) else None
        self.input_pos = torch.tensor([T], device=device)  # [1], advanced in place

    def slots(self, T: int) -> int:
        """Cache slots this call needs: prompt + max_new_tokens (the whole window when compiled: one shape)."""
        return self.gen.model.config.max_position_embeddings if self.gen.compile else T + self.config.max_new_tokens

    def loop(self) -> Iterator[Generation]:
        state, logits = self.state, self.prefill()
        for i in range(self.config.max_new_tokens):
            self.choose(logits, i)
            yield state
            if i + 1 == self.config.max_new_tokens or bool(state.done.all()):
                return
            logits = self.next_logits()

    def _seen(self, attention_mask):
        """bool [B, V] of the tokens each prompt holds (the pads left out), updated in place as tokens come."""
        V = self.gen.model.config.vocab_size
        seen = torch.zeros(self.input_ids.shape[0], V + 1, dtype=torch.bool, device=self.input_ids.device)
        prompt = self.input_ids if attention_mask is None else self.input_ids.masked_fill(attention_mask == 0, V)
        return seen.scatter_(1, prompt, True)[:, :V]  # column V collected the pads

    def prefill(self):
        logits = prefill(self.gen.model, self.input_ids, self.position_ids, self.slot_mask, self.cache)
        if self.position_ids is not None:  # [B, 1] rotary position of each row's next token, advanced in place
            self.position_ids = self.position_ids[:, -1:] + 1
        return logits

    def choose(self, logits, i: int) -> None:
        """Token i of every row from fp32 logits [B, V], recorded in the state."""
        c, state = self.config, self.state
        scores = process_logits(logits, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                repetition_penalty=c.repetition_penalty, seen=self.seen)
        token = sample(scores, c.temperature, self.generator)  # [B]
        token = torch.where(state.done, self.pad_id, token)  # rows already stopped emit padding (as HF does)
        state.tokens[:, i] = token
        state.logprobs[:, i] = torch.where(state.done, 0.0, logits.log_softmax(-1).gather(1, token[:, None])[:, 0])
        state.lengths += ~state.done
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        state.done |= torch.isin(token, self.ends)
        state.n = i + 1
        if c.stop_strings:
            for b in torch.nonzero(~state.done).flatten().tolist():
                if self.stopped_by_string(b, state.n):
                    state.done[b] = True

    def stopped_by_string(self, b: int, n: int) -> bool:
        """Whether row b's first n new tokens decode to a text holding a stop string."""
        text = self.tokenizer.decode(self.state.tokens[b, :n].tolist())
        return any(s in text for s in self.config.stop_strings)

    def next_logits(self):
        """Logits [B, V] after feeding the tokens just chosen; the slot and the positions move on by one."""
        token = self.state.tokens[:, self.state.n - 1:self.state.n]  # [B, 1]
        logits = self.gen.step(self.gen.model, token, self.input_pos, self.position_ids, self.slot_mask, self.cache)
        self.input_pos += 1
        if self.position_ids is not None:
            self.position_ids += 1
        return logits


def _activation_dtype(model) -> torch.dtype:
    """The dtype k and v come out in, which the cache stores: autocast's when it is on, else the weights'."""
    w = model.gpt_neox.embed_in.weight
    return torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype


# ---------------------------------------------------------------------------------------------- entry points
def generate(model, input_ids, config: GenerationConfig | None = None, *, compile: bool = False, draft_model=None,
             attention_mask=None, tokenizer=None, return_logprobs: bool = False, return_stats: bool = False,
             **settings):
    """New token ids [B, N] for prompts input_ids with a fresh Generator: see Generator.generate. settings are
    GenerationConfig's fields (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, eos_token_id,
    pad_token_id, stop_strings, num_draft_tokens). draft_model: a smaller model of the same tokenizer that proposes
    num_draft_tokens tokens per target forward (speculative decoding: the output is the target's, exactly in
    distribution, token for token when greedy). To reuse caches and a compiled step across calls, hold a Generator."""
    return Generator(model, compile=compile, draft_model=draft_model).generate(
        input_ids, config, attention_mask=attention_mask, tokenizer=tokenizer, return_logprobs=return_logprobs,
        return_stats=return_stats, **settings)


def stream(model, tokenizer, input_ids, config: GenerationConfig | None = None, *, compile: bool = False,
           draft_model=None, **settings) -> Iterator[str]:
    """The text of one prompt's completion, piece by piece, with a fresh Generator: see Generator.stream."""
    return Generator(model, compile=compile, draft_model=draft_model).stream(tokenizer, input_ids, config, **settings)
