"""Continuous batching: one model loop serves many requests at once on one static KV cache.

    engine = Engine(model, tokenizer, max_batch_size=8); engine.start()
    request = Request(prompt_ids, GenerationConfig(max_new_tokens=64, temperature=0), emit=callback)
    engine.submit(request)      # False at once when the wait queue is full
    # callback(Event) runs on the engine's thread: "token" events, then one "done" (or one "error")
    engine.cancel(request)      # a client went away: its slot is free at the next step

The engine owns a cache of max_batch_size rows ("slots"), each as long as the context window (or max_len). A request
waits in a bounded queue until a slot is free, is prefilled alone into its slot (its own forward), then joins the
batched decode step, one token per step, until its own stop (a stop id such as eos or Dolly's "### End", a stop
string, max_new_tokens, the end of its slot), when it leaves and frees the slot for the next request.

Per-slot positions, not left padding. A row's tokens sit at columns 0..n-1 of its own slot and its rotary positions are
those columns, whatever the other rows hold; a decode step writes each row's key at that row's next column and the
attention mask [B, W] admits exactly the row's own columns. So every row computes what it would compute alone: the
only effect a neighbour has is the floating-point rounding of the batched matrix products (BLAS picks its kernel by
the number of rows), about 1e-7 relative in fp32, which can change a greedy token only at a near-tie of the top two
logits. (Left padding would instead shift every row's columns whenever a longer prompt joins, and a shared write
column would run out of room as requests come and go.) Sampling settings and seeds are per request: each row is
processed with its own temperature / top-k / top-p and drawn with its own torch.Generator, so a seeded request draws
what generate() with that seed draws. Logits are processed as sampling.py describes; shapes: B rows of the decode
batch, P prompt tokens, W key columns in use, V vocabulary.
"""

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..lora.bank import bank_rows
from .config import GenerationConfig
from .run import stop_ids
from .sampling import process_logits, sample
from .streaming import TextStream

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- requests
@dataclass
class Event:
    """What the engine reports about one request. kind "token": one new token (its id, log-probability and top
    alternatives when asked) and the text it completes (may be "": held back inside a multi-byte character or a
    possible stop string); "done": the rest of the text and finish_reason ("stop" or "length"); "error": message."""

    kind: str
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    message: str | None = None


@dataclass(eq=False)
class Request:
    """One completion. prompt: token ids; config: its settings (max_new_tokens, temperature, top_k, top_p, seed,
    eos_token_id = the stop ids, stop_strings); emit(Event) is called from the engine's thread. top_logprobs: also
    report the log-probability of each chosen token and that many alternatives (None: neither); prompt_logprobs:
    also compute each prompt token's log-probability and alternatives at prefill (OpenAI's echo with logprobs).
    adapter: the name of a LoRA tune in the model's AdapterBank (lora/bank.py), None for the base."""

    prompt: Sequence[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    top_logprobs: int | None = None
    prompt_logprobs: bool = False
    adapter: str | None = None
    # filled by the engine
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_scores: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False


@dataclass
class _RowState:
    """The engine's side of a running request: the ids that stop it, its seeded RNG, its text so far."""

    ends: set[int]
    generator: torch.Generator | None
    text: TextStream

    @classmethod
    def of(cls, r: Request, model, tokenizer, device) -> "_RowState":
        ends = stop_ids(model, r.config.eos_token_id, tokenizer)
        seed = r.config.seed
        return cls(set(ends), None if seed is None else torch.Generator(device).manual_seed(seed),
                   TextStream(tokenizer, ends, r.config.stop_strings))


# ----------------------------------------------------------------------------------------------- cache views
class SlotView:
    """A view of one layer's engine cache that the model's forward uses as its KVCache: rows `rows` of the cache,
    each row writing its new keys at its own columns `columns` [B, T], attention reading columns 0..width-1."""

    def __init__(self, layer, rows: slice, columns: torch.Tensor, width: int):
        self.k_cache, self.v_cache = layer.k_cache[rows], layer.v_cache[rows]  # [B, nh, max_len, hs] views
        self.columns, self.max_len = columns, width

    def update(self, input_pos, k, v):  # k, v [B, nh, T, hs]; input_pos is the Mask's, the columns are ours
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)[:, None]  # [B, 1], broadcast against columns [B, T]
        self.k_cache[rows, :, self.columns] = k.transpose(1, 2).to(self.k_cache.dtype)  # indexed as [B, T, nh, hs]
        self.v_cache[rows, :, self.columns] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache[:, :, :self.max_len], self.v_cache[:, :, :self.max_len]  # [B, nh, W, hs]


# ----------------------------------------------------------------------------------------------------- engine
class Engine:
    """The model loop of a server: max_batch_size slots on one static KV cache (max_len columns each; default the
    context window), a wait queue of at most max_queue requests beyond them. Thread-safe: submit and cancel from any
    thread; the model runs on the engine's own thread (start / stop). stats counts requests by outcome,
    decode_steps[n] the decode steps that carried n requests."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int | None = None,
                 max_len: int | None = None):
        window = model.config.max_position_embeddings
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_len is not None and not 2 <= max_len <= window:
            raise ValueError(f"max_len must be in [2, {window}] (the context window), got {max_len}")
        self.model, self.tokenizer = model.eval(), tokenizer
        if model.backend == "triton":  # the kernels write one shared cache column per step; rows here write their own
            model.backend = "sdpa"
        self.max_batch_size, self.max_len = max_batch_size, max_len or window
        self.max_queue = 4 * max_batch_size if max_queue is None else max_queue
        self.device = model.gpt_neox.embed_in.weight.device
        self.cache = model.new_cache(max_batch_size, self.max_len)  # per layer [slots, nh, max_len, hs]
        self.rows: list[Request | None] = [None] * max_batch_size
        self.waiting: deque[Request] = deque()
        self.stats = dict(completed=0, cancelled=0, failed=0, rejected=0)
        self.decode_steps = [0] * (max_batch_size + 1)  # decode steps by how many requests they carried
        self._state: dict[int, _RowState] = {}  # id(request) -> what the engine keeps for it while it runs
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = None

    # ------------------------------------------------------------------------------------- the public side
    @property
    def busy(self) -> int:
        """Slots holding a request."""
        return sum(r is not None for r in self.rows)

    def submit(self, request: Request) -> bool:
        """Queue a request; False (nothing queued) when the wait queue already holds max_queue requests."""
        P = len(request.prompt)
        if not 1 <= P < self.max_len:
            raise ValueError(f"the prompt has {P} tokens; a slot holds {self.max_len} (prompt + new tokens)")
        if request.adapter is not None:
            bank_rows(self.model, [request.adapter], 1)  # a ValueError now for no bank or an unknown name
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                return False
            self.waiting.append(request)
            self._cond.notify()
        return True

    def cancel(self, request: Request) -> None:
        """Drop a request (its client left): out of the queue now, out of its slot before the next decode step."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="gptneox-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """End the loop; requests still queued or running get an "error" event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for r in [*self.waiting, *filter(None, self.rows)]:
            self._fail(r, "the server is shutting down")
        self.waiting.clear()

    # --------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self.waiting or self.busy)
                if self._stopping:
                    return
                for r in [r for r in self.waiting if r.cancelled]:
                    self.waiting.remove(r)
                    self.stats["cancelled"] += 1
                free = self.max_batch_size - self.busy
                admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            for r in self.rows:
                if r is not None and r.cancelled:
                    self._release(r, "cancelled")
            for r in admitted:
                self._start(r)
            if self.busy:
                self._decode()

    def _start(self, r: Request) -> None:
        """Prefill r alone into the lowest free slot, then choose its first token."""
        slot = self.rows.index(None)
        self.rows[slot] = r
        try:
            self._state[id(r)] = _RowState.of(r, self.model, self.tokenizer, self.device)
            logits = self._prefill(slot, r)  # [P or 1, V] fp32
            if r.prompt_logprobs:
                r.prompt_scores = [None] + [self._scores(logits[t:t + 1], r.prompt[t + 1], max(r.top_logprobs or 0, 1))
                                            for t in range(len(r.prompt) - 1)]
            self._advance(r, logits[-1:])
        except Exception as e:  # noqa: BLE001 - the request it touched fails, the loop goes on
            log.exception("prefill failed")
            self._fail(r, f"the model failed on this request: {type(e).__name__}: {e}")

    @torch.no_grad()
    def _prefill(self, slot: int, r: Request) -> torch.Tensor:
        """Logits [P, V] (prompt_logprobs) or [1, V] of the last position, the prompt written at columns 0..P-1."""
        P = len(r.prompt)
        ids = torch.tensor([list(r.prompt)], device=self.device)  # [1, P]
        cols = torch.arange(P, device=self.device)  # [P]: the slot's first P columns, positions 0..P-1
        cache = [SlotView(layer, slice(slot, slot + 1), cols[None], P) for layer in self.cache]
        with self._rows([r]):
            logits = self.model(ids, cache=cache, input_pos=cols, logits_to_keep=0 if r.prompt_logprobs else 1)
        return logits[0].float()

    @torch.no_grad()
    def _decode(self) -> None:
        """One token for every busy row: rows 0..B-1 (the lowest slots, free ones among them fed a dummy token)."""
        for r in filter(None, self.rows):  # a request whose tune left the bank fails alone
            bank = getattr(self.model, "adapter_bank", None)
            if r.adapter is not None and (bank is None or r.adapter not in bank.names):
                self._fail(r, f"adapter {r.adapter!r} was removed from the bank")
        if not self.busy:
            return
        B = max(i for i, r in enumerate(self.rows) if r is not None) + 1
        rows = self.rows[:B]
        self.decode_steps[self.busy] += 1
        last = [r.tokens[-1] if r else 0 for r in rows]
        column = [len(r.prompt) + len(r.tokens) - 1 if r else 0 for r in rows]  # where each fed token goes
        x = torch.tensor(last, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(column, device=self.device)[:, None]  # [B, 1]: the column is the rotary position
        W = max(column) + 1
        mask = (torch.arange(W, device=self.device)[None] <= pos).long()  # [B, W]: each row's own columns
        cache = [SlotView(layer, slice(0, B), pos, W) for layer in self.cache]
        # input_pos [W]: a query slot past every key, so the Mask's causal rule admits all W columns and its
        # own-slot rule none; the attention mask alone then says which keys each row sees
        try:
            with self._rows(rows):
                logits = self.model(x, position_ids=pos, attention_mask=mask, cache=cache,
                                    input_pos=torch.tensor([W], device=self.device))[:, -1].float()  # [B, V]
        except Exception as e:  # noqa: BLE001 - every row of the step fails, the loop goes on
            log.exception("decode step failed")
            for r in filter(None, rows):
                self._fail(r, f"the model failed on this batch: {type(e).__name__}: {e}")
            return
        greedy = logits.argmax(-1).tolist()  # [B]: one sync for every greedy row (what sample() picks at 0)
        for b, r in enumerate(rows):
            if r is not None:
                try:
                    self._advance(r, logits[b:b + 1], greedy[b] if r.config.temperature == 0 else None)
                except Exception as e:  # noqa: BLE001
                    log.exception("sampling failed")
                    self._fail(r, f"sampling failed for this request: {type(e).__name__}: {e}")

    def _rows(self, rows: list[Request | None]):
        """The context giving each row its request's LoRA tune (free rows: the base); none when no row has one."""
        adapters = [r.adapter if r is not None else None for r in rows]
        return nullcontext() if all(a is None for a in adapters) else bank_rows(self.model, adapters, len(rows))

    # ------------------------------------------------------------------------------------------ one row
    def _advance(self, r: Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Choose r's next token from its fp32 logits [1, V] (token: already chosen, greedy), report it, and release
        r if it stopped."""
        c, state = r.config, self._state[id(r)]
        if token is None:
            scores = process_logits(logits, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
            token = int(sample(scores, c.temperature, state.generator)[0])
        r.tokens.append(token)
        event = Event("token", token=token)
        if r.top_logprobs is not None:
            r.logprobs.append(self._scores(logits, token, r.top_logprobs))
            event.logprob, event.top = r.logprobs[-1]
        reason = self._stop_reason(r, token, state.ends)
        event.text = state.text.update(r.tokens, final=reason is not None)
        r.emit(event)
        if reason is not None:
            self._release(r, reason)

    def _stop_reason(self, r: Request, token: int, ends: set[int]) -> str | None:
        c = r.config
        if token in ends:
            return "stop"
        if c.stop_strings:
            text = self.tokenizer.decode(r.tokens)
            if any(s in text for s in c.stop_strings):
                return "stop"
        if len(r.tokens) >= c.max_new_tokens or len(r.prompt) + len(r.tokens) >= self.max_len:
            return "length"
        return None

    @staticmethod
    def _scores(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        """log-probability of token under the raw logits [1, V] (before any processing, as generate's logprobs),
        and the k most likely tokens with theirs."""
        logp = logits[0].log_softmax(-1)  # [V]
        top = torch.topk(logp, k) if k else None
        return float(logp[token]), ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))

    def _release(self, r: Request, reason: str) -> None:
        """r leaves its slot: "stop" / "length" end it normally (a "done" event), "cancelled" silently."""
        self._forget(r)
        r.finish_reason = reason
        if reason == "cancelled":
            self.stats["cancelled"] += 1
            return
        self.stats["completed"] += 1
        r.emit(Event("done", finish_reason=reason))

    def _fail(self, r: Request, message: str) -> None:
        self._forget(r)
        r.finish_reason = "error"
        self.stats["failed"] += 1
        try:
            r.emit(Event("error", message=message))
        except Exception:  # noqa: BLE001 - a closed consumer must not stop the loop
            log.exception("could not report a failure")

    def _forget(self, r: Request) -> None:
        if r in self.rows:
            self.rows[self.rows.index(r)] = None
        self._state.pop(id(r), None)
