"""Continuous batching: one model loop serves many requests at once on one static KV cache.

    engine = Engine(model, tokenizer, max_batch_size=8); engine.start()
    request = Request(prompt_ids, GenerationConfig(max_new_tokens=64, temperature=0), emit=callback)
    engine.submit(request)      # False at once when the wait queue is full
    # callback(Event) runs on the engine's thread: "token" events, then one "done" (or one "error")
    engine.cancel(request)      # a client went away: its slot is free at the next step

The engine owns a cache of max_batch_size rows ("slots"), each as long as the context window (or max_len), plus one
scratch column. A request waits in a bounded queue until a slot is free, then runs there until its own stop (a stop
id such as eos or Dolly's "### End", a stop string, max_new_tokens, the end of its slot), when it leaves and frees
the slot for the next request.

One forward per step. Each step packs, into one ragged forward (gptneox/ops/ragged.py), the next token of every
running request and chunks of the prompts still being prefilled, so the weights are read once for all of it:
- batched prefill: prompts that arrive together are prefilled together, at most max_prefill_tokens tokens a step;
- chunked prefill: a longer prompt enters over several steps. While requests decode, a step's prompt tokens are
  also held to what costs about half a decode step (measured as the engine runs: StepClock), so running streams'
  inter-token latency grows by about half while a long prompt enters, not by its whole prefill;
- prefix caching (prefix.py): the keys and values of prompt prefixes computed before are copied in, by blocks,
  instead of computed again (a request with prompt_logprobs computes its whole prompt);
- identical prompts queued together (a request's n choices) are prefilled once: the others copy the first's slot.

Per-slot positions, not padding. A row's tokens sit at columns 0..n-1 of its own slot and its rotary positions are
those columns; attention reads exactly the row's own columns. So every row computes what it would compute alone:
the only effect a neighbour has is the floating-point rounding of the packed matrix products (BLAS picks its kernel
by the number of rows), about 1e-7 relative in fp32, which can change a greedy token only at a near-tie of the top
two logits. Sampling settings and seeds are per request: each row is processed with its own logit_bias, penalties,
temperature / top-k / top-p and drawn with its own torch.Generator, so a seeded request draws what generate() with
that seed draws. Shapes: N packed tokens of a step, V vocabulary.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from ..lora.bank import bank_rows
from ..ops.cpu_linear import cpu_linears
from ..ops.ragged import Ragged
from .prefix import BLOCK, PrefixCache
from .requests import Event, Request, Row
from .run import stop_ids
from .sampling import logprob_scores, process_logits, sample

log = logging.getLogger(__name__)
PREFILL_SHARE = 0.5  # while requests decode, a step's prompt tokens cost at most this share of a decode step


class StepClock:
    """Running averages of a step's time: decode steps alone, and the extra seconds per prompt token of mixed ones."""

    def __init__(self):
        self.decode_s = self.token_s = None

    def add(self, seconds: float, prompt_tokens: int, decoding: int) -> None:
        def avg(old, new):
            return new if old is None else 0.8 * old + 0.2 * new
        if prompt_tokens == 0:
            self.decode_s = avg(self.decode_s, seconds)
        elif decoding == 0 or self.decode_s is not None:
            extra = seconds - (self.decode_s if decoding else 0.0)
            self.token_s = avg(self.token_s, max(extra, 0.0) / prompt_tokens)

    def prompt_tokens(self) -> int | None:
        """Prompt tokens a step may add while requests decode (None: not measured yet)."""
        if self.decode_s is None or not self.token_s:
            return None
        return max(BLOCK, int(PREFILL_SHARE * self.decode_s / self.token_s))


# ----------------------------------------------------------------------------------------------------- engine
class Engine:
    """The model loop of a server: max_batch_size slots on one static KV cache (max_len columns each; default the
    context window), a wait queue of at most max_queue requests beyond them. max_prefill_tokens: prompt tokens a
    step may carry; prefix_cache: reuse computed prompt prefixes (prefix_cache_tokens of them at most, default two
    slots' worth); request_timeout: seconds a request may take from submit (None: no limit). Thread-safe: submit
    and cancel from any thread; the model runs on the engine's own thread (start / stop); between_forwards runs
    code (an AdapterBank change) between two steps. stats counts requests by outcome and tokens; decode_steps[n]
    the steps that carried n decoding requests; on_end(request), when set, is called once as each request ends.
    On the CPU the model's nn.Linear layers are switched to ops/cpu_linear.py's products."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int | None = None,
                 max_len: int | None = None, max_prefill_tokens: int = 512, prefix_cache: bool = True,
                 prefix_cache_tokens: int | None = None, request_timeout: float | None = None):
        window = model.config.max_position_embeddings
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_len is not None and not 2 <= max_len <= window:
            raise ValueError(f"max_len must be in [2, {window}] (the context window), got {max_len}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}")
        if prefix_cache_tokens is not None and prefix_cache_tokens < BLOCK:
            raise ValueError(f"prefix_cache_tokens must be at least {BLOCK} (one block), got {prefix_cache_tokens}; "
                             "prefix_cache=False turns the cache off")
        if request_timeout is not None and request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive seconds, got {request_timeout}")
        self.model, self.tokenizer = model.eval(), tokenizer
        if model.backend == "triton":  # ragged steps run the torch path
            model.backend = "sdpa"
        self.max_batch_size, self.max_len = max_batch_size, max_len or window
        self.max_queue = 4 * max_batch_size if max_queue is None else max_queue
        self.max_prefill_tokens, self.request_timeout = max_prefill_tokens, request_timeout
        self.device = model.gpt_neox.embed_in.weight.device
        if self.device.type == "cpu":  # a step's few rows read each weight once (ops/cpu_linear.py)
            cpu_linears(model)
        self.cache = model.new_cache(max_batch_size, self.max_len + 1)  # per layer [slots, nh, max_len + 1, hs]
        self.prefix = None
        if prefix_cache:
            tokens = 2 * self.max_len if prefix_cache_tokens is None else prefix_cache_tokens
            self.prefix = PrefixCache(model.config, tokens // BLOCK, dtype=self.cache[0].k_cache.dtype,
                                      device=self.device)
        self.rows: list[Request | None] = [None] * max_batch_size
        self.waiting: deque[Request] = deque()
        self.stats = dict(completed=0, cancelled=0, failed=0, rejected=0, timed_out=0, prompt_tokens=0,
                          cached_tokens=0, generated_tokens=0)
        self.decode_steps = [0] * (max_batch_size + 1)  # steps by how many decoding requests they carried
        self.on_end: Callable[[Request], None] | None = None
        self.clock = StepClock()
        self._state: dict[int, Row] = {}  # id(request) -> what the engine keeps for it while it runs
        self._cond = threading.Condition()
        self.forward_lock, self.gate = threading.Lock(), threading.Lock()
        self._stopping = False
        self._thread = None

    # ------------------------------------------------------------------------------------- the public side
    @property
    def busy(self) -> int:
        """Slots holding a request."""
        return sum(r is not None for r in self.rows)

    def idle(self) -> bool:
        """Nothing queued, no slot busy."""
        with self._cond:
            return not self.waiting and not self.busy

    def submit(self, request: Request) -> bool:
        """Queue a request; False (nothing queued) when the wait queue already holds max_queue requests."""
        return self.submit_all([request])

    def submit_all(self, requests: Sequence[Request]) -> bool:
        """Queue every request or none: False when the wait queue has no room for them all; a ValueError (nothing
        queued) for a request the engine cannot run. Queued together, identical prompts share one prefill."""
        for request in requests:
            self._check(request)
        now = time.monotonic()
        for request in requests:
            request.arrival = now
            if request.deadline is None and self.request_timeout is not None:
                request.deadline = now + self.request_timeout
        with self._cond:
            if len(self.waiting) + len(requests) > self.max_queue:
                self.stats["rejected"] += len(requests)
                return False
            self.waiting.extend(requests)
            self._cond.notify()
        return True

    def _check(self, request: Request) -> None:
        P = len(request.prompt)
        if not 1 <= P < self.max_len:
            raise ValueError(f"the prompt has {P} tokens; a slot holds {self.max_len} (prompt + new tokens)")
        if request.adapter is not None:
            bank_rows(self.model, [request.adapter], 1)  # a ValueError now for no bank or an unknown name
        V = self.model.config.vocab_size
        if any(not 0 <= int(t) < V for t in (request.logit_bias or {})):
            raise ValueError(f"logit_bias: token ids must lie in [0, {V})")

    def cancel(self, request: Request) -> None:
        """Drop a request (its client left): out of the queue and out of its slot at the next step."""
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
        with self._cond:
            left = [*self.waiting, *filter(None, self.rows)]
            self.waiting.clear()
        for r in left:
            self._fail(r, "the server is shutting down", "shutdown")

    def between_forwards(self, op, *args):
        """op(*args) on the calling thread while no step runs (it waits for the step in progress, not for many)."""
        with self.gate, self.forward_lock:
            return op(*args)

    # --------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self.waiting or self.busy)
                if self._stopping:
                    return
                now = time.monotonic()
                gone = [r for r in self.waiting if r.cancelled or _late(r, now)]
                for r in gone:
                    self.waiting.remove(r)
                free = self.max_batch_size - self.busy
                admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            for r in [*gone, *filter(None, self.rows)]:
                if r.cancelled:
                    self._release(r, "cancelled")
                elif _late(r, now):
                    self._timeout(r)
            with self.gate:
                pass
            with self.forward_lock:
                for r in admitted:
                    self._admit(r)
                self._step()

    def _admit(self, r: Request) -> None:
        """r takes the lowest free slot: its prompt's cached prefix is copied in, or it waits for an identical
        prompt's prefill to copy."""
        slot = self.rows.index(None)
        self.rows[slot] = r
        try:
            ends = stop_ids(self.model, r.config.eos_token_id, self.tokenizer)
            row = self._state[id(r)] = Row.of(r, slot, ends, self.tokenizer, self.model.config.vocab_size, self.device)
            self.stats["prompt_tokens"] += len(r.prompt)
            row.leader = next((o for o in self.rows if o is not None and o is not r and self._twins(o, r)), None)
            if row.leader is None and self.prefix is not None and not r.prompt_logprobs:
                row.filled = r.cached_tokens = self.prefix.load(r.prompt, self._tune(r), self.cache, slot,
                                                                limit=len(r.prompt) - 1)
                self.stats["cached_tokens"] += row.filled
        except Exception as e:  # noqa: BLE001 - the request it touched fails, the loop goes on
            log.exception("admission failed")
            self._fail(r, f"the model failed on this request: {type(e).__name__}: {e}")

    def _twins(self, leader: Request, r: Request) -> bool:
        """Whether r may copy leader's prefill: the same prompt and tune, leader still prefilling it, no prompt
        log-probabilities asked by either."""
        row = self._state.get(id(leader))
        return (row is not None and row.leader is None and row.filled < len(leader.prompt)
                and not leader.prompt_logprobs and not r.prompt_logprobs and leader.adapter == r.adapter
                and list(leader.prompt) == list(r.prompt))

    def _tune(self, r: Request):
        """What the prefix cache keys a request's weights by: None (the base) or the tune's load."""
        return None if r.adapter is None else (r.adapter, self.model.adapter_bank.serial(r.adapter))

    # --------------------------------------------------------------------------------------------- one step
    def _plan(self):
        """The step's sequences [(request, start, n)]: every decoding row's last token, then prompt chunks (oldest
        request first) within the step's prompt budget."""
        decoding, prefilling = [], []
        for r in filter(None, self.rows):
            row = self._state[id(r)]
            if row.filled == len(r.prompt) and r.tokens:
                decoding.append((r, len(r.prompt) + len(r.tokens) - 1, 1))
            elif row.leader is None and row.filled < len(r.prompt):
                prefilling.append(r)
        budget = self.max_prefill_tokens
        cap = self.clock.prompt_tokens() if decoding else None
        budget = min(budget, cap) if cap is not None else budget
        chunks = []
        for r in sorted(prefilling, key=lambda r: r.arrival):
            if budget <= 0:
                break
            start = self._state[id(r)].filled
            n = min(len(r.prompt) - start, budget)
            chunks.append((r, start, n))
            budget -= n
        return decoding, chunks

    @torch.no_grad()
    def _step(self) -> None:
        """One forward: the decoding rows' next tokens and the planned prompt chunks."""
        self._drop_removed_tunes()
        decoding, chunks = self._plan()
        seqs = decoding + chunks
        if not seqs:
            return
        ids = [r.tokens[-1] for r, _, _ in decoding] + [t for r, s, n in chunks for t in r.prompt[s:s + n]]
        ragged = Ragged([(self._state[id(r)].slot, s, n) for r, s, n in seqs], self.device)
        keep, wanted, offset = [], [], 0  # packed positions whose logits are needed; per sequence (at, count)
        for r, s, n in seqs:
            if r.prompt_logprobs and not r.tokens:  # every position's logits score the prompt
                wanted.append((len(keep), n))
                keep += range(offset, offset + n)
            elif r.tokens or s + n == len(r.prompt):  # a decode step, or the prompt's last chunk
                wanted.append((len(keep), 1))
                keep.append(offset + n - 1)
            else:
                wanted.append(None)
            offset += n
        self.decode_steps[len(decoding)] += 1
        t0 = time.perf_counter()
        try:
            kept = [r.adapter for (r, _, _), w in zip(seqs, wanted) if w is not None for _ in range(w[1])]
            with self._adapters([r.adapter for r, _, n in seqs for _ in range(n)], kept):
                logits = self.model(torch.tensor([ids], device=self.device), position_ids=ragged.position_ids,
                                    attention_mask=ragged, cache=ragged.views(self.cache),
                                    input_pos=torch.arange(len(ids), device=self.device),
                                    logits_to_keep=torch.tensor(keep, device=self.device))[0].float()  # [K, V]
        except Exception as e:  # noqa: BLE001 - every request of the step fails, the loop goes on
            log.exception("step failed")
            for r, _, _ in seqs:
                self._fail(r, f"the model failed on this batch: {type(e).__name__}: {e}")
            return
        for r, s, n in chunks:
            self._state[id(r)].filled = s + n
        self._choose(seqs, wanted, logits)  # its argmax(...).tolist() waits for the device: the time below is real
        self.clock.add(time.perf_counter() - t0, sum(n for _, _, n in chunks), len(decoding))

    def _choose(self, seqs, wanted, logits: torch.Tensor) -> None:
        """Each sequence's outcome: a decoding row's next token; a finished prefill's first token (and its twins');
        a prompt_logprobs chunk's scores."""
        greedy = logits.argmax(-1).tolist()  # one sync for every greedy row without adjustments
        for (r, s, n), w in zip(seqs, wanted):
            if w is None:
                continue
            at, count = w
            try:
                if r.prompt_logprobs and not r.tokens:
                    self._score_prompt(r, s, logits[at:at + count])
                    if s + n < len(r.prompt):
                        continue
                    at = at + count - 1
                if not r.tokens:  # its prefill is complete
                    self._prefilled(r, logits[at:at + 1])
                self._advance(r, logits[at:at + 1], greedy[at])
            except Exception as e:  # noqa: BLE001
                log.exception("sampling failed")
                self._fail(r, f"sampling failed for this request: {type(e).__name__}: {e}")

    def _score_prompt(self, r: Request, start: int, logits: torch.Tensor) -> None:
        """prompt_scores of the prompt tokens that the chunk's logits [n, V] predict."""
        if start == 0:
            r.prompt_scores = [None]
        k = max(r.top_logprobs or 0, 1)
        for i in range(logits.shape[0]):
            if start + i + 1 < len(r.prompt):
                r.prompt_scores.append(logprob_scores(logits[i:i + 1], r.prompt[start + i + 1], k))

    def _prefilled(self, r: Request, logits: torch.Tensor) -> None:
        """r's prompt is in its slot: keep its blocks, and give each twin waiting on it a copy and its first token."""
        row, P = self._state[id(r)], len(r.prompt)
        if self.prefix is not None:
            self.prefix.store(r.prompt, self._tune(r), self.cache, row.slot)
        for twin in [t for t in self.rows if t is not None and self._state[id(t)].leader is r]:
            own = self._state[id(twin)]
            for layer in self.cache:
                layer.k_cache[own.slot, :, :P] = layer.k_cache[row.slot, :, :P]
                layer.v_cache[own.slot, :, :P] = layer.v_cache[row.slot, :, :P]
            own.filled, own.leader = P, None
            self._advance(twin, logits)

    def _adapters(self, tunes: list[str | None], kept: list[str | None]):
        """The context giving each packed token its request's LoRA tune (kept: those of the tokens whose logits are
        kept, for embed_out); none when no request has one."""
        if all(t is None for t in tunes):
            return nullcontext()
        return self.model.adapter_bank.rows(tunes, per_token=True, kept=kept)

    def _drop_removed_tunes(self) -> None:
        bank = getattr(self.model, "adapter_bank", None)
        for r in filter(None, self.rows):  # a request whose tune left the bank fails alone
            if r.adapter is not None and (bank is None or r.adapter not in bank.names):
                self._fail(r, f"adapter {r.adapter!r} was removed from the bank")

    # ------------------------------------------------------------------------------------------ one row
    def _advance(self, r: Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Choose r's next token from its fp32 logits [1, V] (token: the raw argmax, used when r is greedy with no
        logit adjustments), report it, and release r if it stopped."""
        c, row = r.config, self._state[id(r)]
        raw, logits = logits, row.adjust(r, logits)
        if token is None or c.temperature != 0 or logits is not raw:
            scores = process_logits(logits, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
            token = int(sample(scores, c.temperature, row.generator)[0])
        r.tokens.append(token)
        r.token_times.append(time.monotonic())
        self.stats["generated_tokens"] += 1
        row.count(token)
        event = Event("token", token=token)
        if r.top_logprobs is not None:
            r.logprobs.append(logprob_scores(raw, token, r.top_logprobs))
            event.logprob, event.top = r.logprobs[-1]
        reason = self._stop_reason(r, token, row.ends)
        event.text = row.text.update(r.tokens, final=reason is not None)
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

    def _release(self, r: Request, reason: str) -> None:
        """r leaves its slot: "stop" / "length" end it normally (a "done" event; the blocks it wrote are kept in
        the prefix cache), "cancelled" silently."""
        row = self._state.get(id(r))
        if reason != "cancelled" and row is not None and self.prefix is not None and not r.prompt_logprobs:
            try:  # every fed token's key and value: the prompt and all generated tokens but the last
                self.prefix.store([*r.prompt, *r.tokens[:-1]], self._tune(r), self.cache, row.slot)
            except Exception:  # noqa: BLE001 - a cache that cannot keep them costs speed, not the answer
                log.exception("could not keep a finished request's blocks")
        self._forget(r)
        r.finish_reason = reason
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        else:
            self.stats["completed"] += 1
            r.emit(Event("done", finish_reason=reason))
        self._ended(r)

    def _timeout(self, r: Request) -> None:
        self.stats["timed_out"] += 1
        waited = time.monotonic() - r.arrival
        self._fail(r, f"the request timed out after {waited:.1f} s (the server's request timeout)", "timeout")

    def _fail(self, r: Request, message: str, code: str | None = None) -> None:
        self._forget(r)
        r.finish_reason = "error"
        self.stats["failed"] += 1
        try:
            r.emit(Event("error", message=message, code=code))
        except Exception:  # noqa: BLE001 - a closed consumer must not stop the loop
            log.exception("could not report a failure")
        self._ended(r)

    def _forget(self, r: Request) -> None:
        if r in self.rows:
            self.rows[self.rows.index(r)] = None
        self._state.pop(id(r), None)
        for row in self._state.values():  # its twins prefill for themselves
            if row.leader is r:
                row.leader = None

    def _ended(self, r: Request) -> None:
        if self.on_end is not None:
            try:
                self.on_end(r)
            except Exception:  # noqa: BLE001
                log.exception("on_end failed")


def _late(r: Request, now: float) -> bool:
    return r.deadline is not None and now > r.deadline and r.finish_reason is None
