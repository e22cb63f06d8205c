"""Text generation: prefill a static KV cache, then decode one token at a time, with the usual sampling controls.

    generate(model, prompts, max_new_tokens=20, temperature=0)      greedy, token for token HF's generate
    stream(model, tokenizer, prompt, max_new_tokens=20)             the same loop, yielding text as it is produced
    gen = Generator(model, compile=True); gen.generate(...)         the state both use, kept across calls

The settings are one validated frozen dataclass, GenerationConfig; every entry point takes one, or its fields as
keywords. A Generator owns what outlives a call: the static KV cache (reused while its shape fits) and, with
compile=True, the torch.compile'd decode step, so a held Generator compiles once. How one call runs: run.py.
"""

from collections.abc import Iterator

import torch

from ..ops.cpu_linear import cpu_linears
from .config import GenerationConfig
from .run import Generation, Run, decode_step, stop_ids
from .speculative import SpeculativeRun, check_draft
from .streaming import TextStream


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
            check_draft(model, draft_model, compile)
        for m in (model, draft_model):  # on the CPU a decode step's rows read each weight once (ops/cpu_linear.py)
            if m is not None and m.gpt_neox.embed_in.weight.device.type == "cpu":
                cpu_linears(m)
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
    def steps(self, input_ids, config: GenerationConfig, *, attention_mask=None, tokenizer=None, adapters=None
              ) -> Iterator[Generation]:
        """The generation loop as an iterator: yields the Generation state after every new token (with a draft
        model, after every target forward, which may add several tokens to each row). adapters: see generate."""
        if adapters is not None and (self.compile or self.draft_model is not None):
            raise ValueError("adapters= (an AdapterBank's tunes per row) runs uncompiled and without a draft model "
                             "for now: use compile=False and no draft_model")
        if self.draft_model is None:
            run = Run(self, input_ids, attention_mask, config, tokenizer, adapters)
        else:
            run = SpeculativeRun(self, input_ids, attention_mask, config, tokenizer)
        try:
            yield from run.loop()
        finally:
            self.tokens_generated += int(run.state.lengths.sum())

    def generate(self, input_ids, config: GenerationConfig | None = None, *, attention_mask=None, tokenizer=None,
                 adapters=None, return_logprobs: bool = False, return_stats: bool = False, **settings):
        """New token ids [B, N] (N <= max_new_tokens: the loop ends when every row has stopped) for prompts
        input_ids: a tensor [B, T] (left-padded, with attention_mask) or a list of id lists of any lengths.

        The stopping token is kept and later slots hold the pad id, as in HF's generate. return_logprobs: also
        return logprobs [B, N], the model's log-probability (log_softmax of the raw logits, before any processing)
        of each chosen token, 0 on padding. return_stats (with a draft model): also return this call's
        speculative.Stats (acceptance rate, tokens per target forward, draft and target time).
        adapters: one LoRA tune per prompt, a name of the model's AdapterBank or None for the base alone (a single
        name: every prompt); each row keeps its tune through prefill and every decode step (lora/bank.py).
        settings: GenerationConfig fields, replacing config's.
        """
        state, before = None, self.stats
        for state in self.steps(input_ids, GenerationConfig.of(config, **settings), attention_mask=attention_mask,
                                tokenizer=tokenizer, adapters=adapters):
            pass  # run to the end; the last state holds the result
        out = [state.tokens[:, :state.n]]
        if return_logprobs:
            out.append(state.logprobs[:, :state.n])
        if return_stats:
            if self.draft_model is None:
                raise ValueError("return_stats reports speculative decoding: give the Generator a draft_model")
            out.append(self.stats.since(before))
        return out[0] if len(out) == 1 else tuple(out)

    def stream(self, tokenizer, input_ids, config: GenerationConfig | None = None, *, adapters=None,
               **settings) -> Iterator[str]:
        """Yield the generated text of one prompt (a list of ids, or a [1, T] tensor) piece by piece.

        A piece never ends inside a multi-byte character nor inside a possible stop string; the stop token and stop
        string are not part of the text. The pieces join to streaming.completion_text() of generate()'s tokens.
        adapters: [the prompt's tune or None], or its name (see generate).
        """
        config = GenerationConfig.of(config, **settings)
        if isinstance(input_ids, torch.Tensor) and (input_ids.dim() != 2 or input_ids.shape[0] != 1):
            raise ValueError(f"stream() takes one prompt [1, T], got shape {list(input_ids.shape)}")
        prompts = input_ids if isinstance(input_ids, torch.Tensor) else [list(input_ids)]
        text = TextStream(tokenizer, stop_ids(self.model, config.eos_token_id, tokenizer), config.stop_strings)
        state = None
        for state in self.steps(prompts, config, tokenizer=tokenizer, adapters=adapters):
            piece = text.update(state.tokens[0, :state.n].tolist(), final=bool(state.done[0]))
            if piece:
                yield piece
        piece = text.update(state.tokens[0, :state.n].tolist(), final=True)
        if piece:
            yield piece


# ---------------------------------------------------------------------------------------------- entry points
def generate(model, input_ids, config: GenerationConfig | None = None, *, compile: bool = False, draft_model=None,
             attention_mask=None, tokenizer=None, adapters=None, return_logprobs: bool = False,
             return_stats: bool = False, **settings):
    """New token ids [B, N] for prompts input_ids with a fresh Generator: see Generator.generate. settings are
    GenerationConfig's fields (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, eos_token_id,
    pad_token_id, stop_strings, num_draft_tokens). draft_model: a smaller model of the same tokenizer that proposes
    num_draft_tokens tokens per target forward (speculative decoding: the output is the target's, exactly in
    distribution, token for token when greedy). adapters: one LoRA tune of model.adapter_bank (or None) per prompt
    (lora/bank.py). To reuse caches and a compiled step across calls, hold a Generator."""
    return Generator(model, compile=compile, draft_model=draft_model).generate(
        input_ids, config, attention_mask=attention_mask, tokenizer=tokenizer, adapters=adapters,
        return_logprobs=return_logprobs, return_stats=return_stats, **settings)


def stream(model, tokenizer, input_ids, config: GenerationConfig | None = None, *, compile: bool = False,
           draft_model=None, adapters=None, **settings) -> Iterator[str]:
    """The text of one prompt's completion, piece by piece, with a fresh Generator: see Generator.stream."""
    return Generator(model, compile=compile, draft_model=draft_model).stream(tokenizer, input_ids, config,
                                                                             adapters=adapters, **settings)
