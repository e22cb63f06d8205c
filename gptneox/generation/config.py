"""GenerationConfig: how to generate, one validated frozen dataclass that every entry point takes (HF's names)."""

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace


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
    num_draft_tokens: int = 4  # with a draft model: tokens it proposes per target forward (speculative.py)

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
