"""What the serving engine (batching.py) takes and reports: a Request, its Events, and the engine's Row for it while
it runs (its slot, prefill progress, stop ids, RNG, logit_bias and penalty state, text stream)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .sampling import apply_openai_penalties
from .streaming import TextStream


# --------------------------------------------------------------------------------------------------- requests
@dataclass
class Event:
    """What the engine reports about one request. kind "token": one new token (its id, log-probability and top
    alternatives when asked) and the text it completes (may be "": held back inside a multi-byte character or a
    possible stop string); "done": the rest of the text and finish_reason ("stop" or "length"); "error": message,
    and code: "timeout" (past its deadline), "shutdown" (the engine stopped) or None (the model or sampling failed)."""

    kind: str
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    message: str | None = None
    code: str | None = None


@dataclass(eq=False)
class Request:
    """One completion. prompt: token ids; config: its settings (max_new_tokens, temperature, top_k, top_p, seed,
    eos_token_id = the stop ids, stop_strings); emit(Event) is called from the engine's thread. top_logprobs: also
    report the log-probability of each chosen token (under the model's raw logits) and that many alternatives (None:
    neither); prompt_logprobs: also compute each prompt token's (OpenAI's echo with logprobs). adapter: the name of a
    LoRA tune in the model's AdapterBank (lora/bank.py), None for the base. id: the caller's name for it (logs).
    logit_bias {token id: bias} is added to the logits, and presence_penalty / frequency_penalty applied as OpenAI
    defines them, before the sampling settings. deadline: time.monotonic() past which it fails ("timed out")."""

    prompt: Sequence[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    top_logprobs: int | None = None
    prompt_logprobs: bool = False
    adapter: str | None = None
    id: str | None = None
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    deadline: float | None = None
    # filled by the engine
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_scores: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    arrival: float = 0.0  # time.monotonic() at submit
    token_times: list[float] = field(default_factory=list)  # time.monotonic() of each token
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


@dataclass(eq=False)
class Row:
    """The engine's side of a running request: its slot, how much of its prompt is in the cache, the identical
    request whose prefill it waits to copy (its leader), its stop ids, seeded RNG, logit adjustments and text."""

    slot: int
    ends: set[int]
    generator: torch.Generator | None
    text: TextStream
    bias: torch.Tensor | None  # [V] logit_bias as a dense row
    counts: torch.Tensor | None  # [V] generated tokens, counted (penalties only)
    filled: int = 0
    leader: Request | None = None

    @classmethod
    def of(cls, r: Request, slot: int, ends, tokenizer, vocab_size: int, device) -> "Row":
        c, bias = r.config, None
        if r.logit_bias:
            bias = torch.zeros(vocab_size, device=device)
            bias[torch.tensor([int(t) for t in r.logit_bias], device=device)] = torch.tensor(
                [float(b) for b in r.logit_bias.values()], device=device)
        counts = torch.zeros(vocab_size, device=device) if r.presence_penalty or r.frequency_penalty else None
        generator = None if c.seed is None else torch.Generator(device).manual_seed(c.seed)
        return cls(slot, set(ends), generator, TextStream(tokenizer, ends, c.stop_strings), bias, counts)

    def adjust(self, r: Request, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] with r's logit_bias and penalties (the same tensor when it has none)."""
        if self.bias is not None:
            logits = logits + self.bias
        if self.counts is not None:
            logits = apply_openai_penalties(logits, self.counts, r.presence_penalty, r.frequency_penalty)
        return logits

    def count(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
