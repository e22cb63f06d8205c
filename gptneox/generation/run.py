"""One generation as a loop: prefill a static KV cache, then decode one token per row at a time until every row stops.

Prompts of different lengths are left-padded; each row gets rotary positions counted from its own first real token
and stops on its own (eos, the Dolly end token, or a stop string). Logits are processed as sampling.py describes.
Facts about Dolly's stopping rule: docs/architecture.md, "Dolly v2". Shapes: B batch, T prompt length, V vocab,
N new tokens.
"""

from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import torch

from ..lora.bank import bank_rows
from .config import GenerationConfig
from .sampling import process_logits, sample


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


class Run:
    """One call of a Generator (gen: its model, compile flag, kv_cache() and step) as a loop of Generation states;
    between steps it holds the cache, masks and positions, the repetition set and the RNG. speculative.SpeculativeRun
    is the same loop with a draft model."""

    def __init__(self, gen, input_ids, attention_mask, config: GenerationConfig, tokenizer, adapters=None):
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
        self.rows = bank_rows(model, adapters, B)  # each row's LoRA tune (lora/bank.py) for every forward, or None
        self.ends = torch.tensor(stop_ids(model, config.eos_token_id, tokenizer), dtype=torch.long, device=device)
        self.pad_id = pad_id = (config.pad_token_id if config.pad_token_id is not None
                                else int(self.ends[0]) if len(self.ends) else 0)
        self.generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
        self.max_len = max_len = self.slots(T)
        self.cache = gen.kv_cache(B, max_len, activation_dtype(model), device)
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
        with self.rows or nullcontext():
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
        with self.rows or nullcontext():
            logits = self.gen.step(self.gen.model, token, self.input_pos, self.position_ids, self.slot_mask,
                                   self.cache)
        self.input_pos += 1
        if self.position_ids is not None:
            self.position_ids += 1
        return logits


def activation_dtype(model) -> torch.dtype:
    """The dtype k and v come out in, which the cache stores: autocast's when it is on, else the weights'."""
    w = model.gpt_neox.embed_in.weight
    return torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
