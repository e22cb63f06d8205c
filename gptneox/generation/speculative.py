"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small model drafts k tokens, the target checks
them in one forward, and the output is the target's own, token for token when greedy, exactly in distribution when
sampling. Every Pythia size and Dolly share one tokenizer (docs/architecture.md, "Tokenizer"), so any smaller one
can draft for a larger one.

One iteration, for every row at once (x is the row's newest token, at cache slot s and rotary position pos):
    draft:   k forwards, x -> d1 -> ... -> dk, each draw from q_j (the draft's processed distribution)
    target:  one forward of [x, d1, ..., dk] -> p_1 ... p_{k+1}
    accept:  d_j while u_j < p_j(d_j) / q_j(d_j) (greedy: while d_j is p_j's argmax); at the first rejection draw
             from max(0, p_j - q_j) renormalised, else (all k accepted) from p_{k+1}: a + 1 new tokens.
Both models keep static KV caches of their own. Rows accept different numbers of tokens, so slots advance by the
batch's largest count; a row's slots past its own count are rejected drafts and become holes in its attention mask
(never seen again), and the next write reuses them at batch size 1. Logits processing (repetition penalty,
temperature, top-k, top-p) is sampling.py's, applied to both distributions as the plain loop applies it.
Padded vocabularies may differ in width (Pythia 50304, 6.9b 50432, 12b 50688): distributions are compared over the
target's width, the draft's extra rows are never drawn, and a target token beyond the draft's rows is fed to the
draft as id 0 (it only drafts worse from there). Shapes: B batch, k drafts, V the target's vocabulary.
"""

import math
import time
from dataclasses import dataclass, replace

import torch

from .run import Run, activation_dtype
from .sampling import process_logits

NEG_INF = float("-inf")


@dataclass
class Stats:
    """What speculation did: drafts proposed and accepted, target and draft forwards, and their seconds."""
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0  # new tokens committed by the iterations (the target's accepted drafts plus its own)
    target_forwards: int = 0  # batched forwards of the target, each verifying k drafts of every unfinished row
    row_forwards: int = 0  # the same, counted once per row it verified
    draft_forwards: int = 0
    target_s: float = 0.0
    draft_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_target_forward(self) -> float:
        """New tokens a row gains per target forward (k + 1 when every draft is accepted)."""
        return self.tokens / self.row_forwards if self.row_forwards else float("nan")

    def since(self, before: "Stats | None") -> "Stats":
        """The counts added since `before` (an earlier copy)."""
        if before is None:
            return replace(self)
        return Stats(*(getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__))

    def __str__(self):
        return (f"{self.acceptance_rate:.0%} of {self.proposed} drafts accepted, {self.tokens_per_target_forward:.2f} "
                f"tokens per target forward; draft {self.draft_s:.2f} s, target {self.target_s:.2f} s")


def check_draft(model, draft, compile: bool) -> None:
    """Refuse a draft that cannot work with this target, saying why."""
    if compile:
        raise ValueError("compile=True is not supported with a draft model yet: run speculative decoding uncompiled")
    target_device, draft_device = model.gpt_neox.embed_in.weight.device, draft.gpt_neox.embed_in.weight.device
    if target_device != draft_device:
        raise ValueError(f"the draft model is on {draft_device}, the target on {target_device}: move the draft "
                         f"(draft.to({str(target_device)!r}))")


def accept(p, q, drafts, greedy: bool, generator=None):
    """(a [B], t [B]): how many drafts each row accepts and the token after them, from the target's distributions
    p [B, k + 1, V] (greedy: its processed logits), the draft's q [B, k, V] and the drafts [B, k]."""
    B, k = drafts.shape
    if greedy:
        choice = p.argmax(-1)  # [B, k + 1]
        a = (choice[:, :k] == drafts).long().cumprod(1).sum(1)  # [B] leading matches
        return a, choice.gather(1, a[:, None])[:, 0]
    p_d = p[:, :k].gather(2, drafts[..., None])[..., 0]  # [B, k] p_j(d_j)
    q_d = q.gather(2, drafts[..., None])[..., 0]
    u = torch.rand(B, k, device=p.device, generator=generator)
    a = (u * q_d < p_d).long().cumprod(1).sum(1)  # accept while u < p / q
    residual = p[:, :k] - q  # [B, k, V]; renormalised below, at the first rejection
    rows = torch.arange(B, device=p.device)
    last = torch.where((a < k)[:, None], residual[rows, a.clamp_max(k - 1)].clamp_min(0), p[:, k])  # [B, V]
    last = torch.where(last.sum(-1, keepdim=True) > 0, last, p[rows, a])  # p == q there: any draw from p is exact
    return a, torch.multinomial(last / last.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


class SpeculativeRun(Run):
    """One call of speculative decoding: the plain run's inputs, state and target cache, plus the draft's cache and
    each row's rotary position, and the slot of its newest token (shared: rows advance together, holes masked)."""

    def __init__(self, gen, input_ids, attention_mask, config, tokenizer):
        super().__init__(gen, input_ids, attention_mask, config, tokenizer)
        draft, k = gen.draft_model, config.num_draft_tokens
        B, T = self.input_ids.shape
        if tokenizer is not None and draft.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the draft model's vocabulary of {draft.config.vocab_size} rows cannot hold the "
                             f"tokenizer's {tokenizer.vocab_size} tokens: a draft must share the target's vocabulary")
        window = draft.config.max_position_embeddings
        if T + config.max_new_tokens > window:
            raise ValueError(f"prompt of {T} tokens + max_new_tokens {config.max_new_tokens} exceeds the draft model's "
                             f"context window of {window} tokens: use a draft with a longer window, or none")
        device = self.input_ids.device
        self.k, self.draft, self.V = k, draft, gen.model.config.vocab_size
        self.draft_cache = gen.kv_cache(B, self.max_len, activation_dtype(draft), device, which="draft")
        real = torch.ones_like(self.input_ids) if self.prompt_mask is None else self.prompt_mask  # [B, T]
        self.mask = torch.ones(B, self.max_len, dtype=torch.long, device=device)  # [B, slots]: 0 on pads, holes
        self.mask[:, :T] = real
        self.pos = real.sum(-1) - 1  # [B] rotary position of each row's newest token (the prompt's last)
        self.s = T - 1  # its slot
        self.plain = bool(real.all())  # no padding and (so far) no holes: slots are positions, no mask needed
        self.prev = self.input_ids[:, -2] if T > 1 else None  # [B] the token at slot s - 1, for the draft's catch-up
        self.stats = gen.stats = gen.stats or Stats()

    def slots(self, T: int) -> int:
        """Every iteration writes k + 1 slots and commits at least one token per unfinished row."""
        return T + (self.config.max_new_tokens + 1) * (self.config.num_draft_tokens + 1)

    def _call(self, model, cache, ids, slot, positions):
        """Logits [B, len, V'] of model on ids [B, len] at consecutive slots from `slot`, positions [B, len]."""
        input_pos = torch.arange(slot, slot + ids.shape[1], device=ids.device)
        plain = self.plain
        return model(ids, position_ids=None if plain else positions, attention_mask=None if plain else self.mask,
                     cache=cache, input_pos=input_pos).float()

    def loop(self):
        with _torch_attention(self.gen.model, self.draft, self.input_ids.shape[0] > 1):
            T = self.input_ids.shape[1]
            if T > 1:  # both caches hold the prompt but its last token, which the first iteration feeds
                rest = self.input_ids[:, :-1]
                positions = (self.mask[:, :T - 1].cumsum(-1) - 1).clamp_min(0)
                self._call(self.gen.model, self.cache, rest, 0, positions)
                self._call(self.draft, self.draft_cache, self._for_draft(rest), 0, positions)
            state = self.state
            while not bool((state.done | (state.lengths >= self.config.max_new_tokens)).all()):
                self.iterate()
                yield state

    def _for_draft(self, ids):
        """Target ids the draft can embed: a row past its (narrower) vocabulary becomes 0."""
        return ids.masked_fill(ids >= self.draft.config.vocab_size, 0)

    def _dist(self, logits, seen):
        """The processed distribution [B, V] (greedy: processed logits) of fp32 logits [B, V'] cut or padded to V."""
        V = self.V
        if logits.shape[-1] < V:
            logits = torch.cat([logits, logits.new_full((logits.shape[0], V - logits.shape[-1]), NEG_INF)], -1)
        c = self.config
        scores = process_logits(logits[:, :V], temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                repetition_penalty=c.repetition_penalty, seen=seen)
        return scores if c.temperature == 0 else scores.softmax(-1)

    def _sync_time(self, t0):
        if self.input_ids.is_cuda:
            torch.cuda.synchronize(self.input_ids.device)
        return time.perf_counter() - t0

    def draft_tokens(self, last):
        """k drafts [B, k], their distributions q [B, k, V] and the repetition sets each position was drawn with."""
        t0, k, s, pos = time.perf_counter(), self.k, self.s, self.pos
        if self.prev is None:  # a one-token prompt: nothing before it
            ids, start, positions = last[:, None], s, pos[:, None]
        else:  # re-feed slot s - 1 too: it holds the draft's last accepted token when all k were accepted
            ids, start, positions = torch.stack([self.prev, last], 1), s - 1, torch.stack([pos - 1, pos], 1)
        logits = self._call(self.draft, self.draft_cache, self._for_draft(ids), start, positions)[:, -1]
        seen = self.seen
        drafts, qs, seens = [], [], []
        for j in range(k):
            seens.append(seen)
            q = self._dist(logits, seen)
            greedy = self.config.temperature == 0
            d = q.argmax(-1) if greedy else torch.multinomial(q, 1, generator=self.generator)[:, 0]  # [B]
            drafts.append(d)
            qs.append(q)
            seen = None if seen is None else seen.clone().scatter_(1, d[:, None], True)
            if j + 1 < k:
                logits = self._call(self.draft, self.draft_cache, self._for_draft(d[:, None]), s + j + 1,
                                    (pos + j + 1)[:, None])[:, -1]
        self.stats.draft_forwards += k
        self.stats.draft_s += self._sync_time(t0)
        return torch.stack(drafts, 1), torch.stack(qs, 1), seens + [seen]

    def iterate(self) -> None:
        """Draft, verify, accept and commit once; the slot pointer and positions move on."""
        state, k, s = self.state, self.k, self.s
        B = state.tokens.shape[0]
        rows = torch.arange(B, device=state.tokens.device)
        last = torch.where(state.lengths > 0, state.tokens[rows, (state.lengths - 1).clamp_min(0)],
                           self.input_ids[:, -1])  # [B] each row's newest token, at slot s
        self.mask[:, s:s + k + 1] = 1  # this iteration's slots; the rejected ones become holes below
        drafts, q, seens = self.draft_tokens(last)
        t0 = time.perf_counter()
        ids = torch.cat([last[:, None], drafts], 1)  # [B, k + 1]
        positions = self.pos[:, None] + torch.arange(k + 1, device=ids.device)  # [B, k + 1]
        logits = self._call(self.gen.model, self.cache, ids, s, positions)  # [B, k + 1, V]
        p = torch.stack([self._dist(logits[:, j], seens[j]) for j in range(k + 1)], 1)  # [B, k + 1, V]
        a, t = accept(p, q, drafts, self.config.temperature == 0, self.generator)
        self.stats.target_forwards += 1
        self.stats.target_s += self._sync_time(t0)
        self.commit(ids, drafts, a, t, logits.log_softmax(-1))

    def commit(self, ids, drafts, a, t, logprobs) -> None:
        """Append each unfinished row's a accepted drafts and the target's token t (cut at a stop and at
        max_new_tokens), mask the slots of its rejected drafts, and advance the slot pointer by the batch's longest
        run; ids [B, k + 1] are what this iteration's slots s .. s + k hold."""
        state, c, s, k = self.state, self.config, self.s, self.k
        active = ~state.done & (state.lengths < c.max_new_tokens)
        a_list, lengths = a.tolist(), state.lengths.tolist()
        longest = max(a_list[b] for b in range(len(a_list)) if active[b])
        stop = set(self.ends.tolist())
        for b in torch.nonzero(active).flatten().tolist():
            self.stats.proposed += k
            self.stats.row_forwards += 1
            self.stats.accepted += a_list[b]
            n = lengths[b]
            for j in range(a_list[b] + 1):
                token = int(drafts[b, j] if j < a_list[b] else t[b])
                state.tokens[b, n] = token
                state.logprobs[b, n] = logprobs[b, j, token]
                n += 1
                self.stats.tokens += 1
                if self.seen is not None:
                    self.seen[b, token] = True
                if token in stop or (c.stop_strings and self.stopped_by_string(b, n)):
                    state.done[b] = True
                if state.done[b] or n == c.max_new_tokens:
                    break
            state.lengths[b] = n
        kept = (torch.arange(longest, device=a.device) < a[:, None]).long()  # [B, longest] slots s+1 .. s+longest
        self.mask[:, s + 1:s + longest + 1] *= kept
        self.plain = self.plain and bool(kept.all())
        self.pos = self.pos + a + 1
        self.prev = torch.where(a == longest, ids[:, longest], self.pad_id)  # slot s + longest, a hole if a < longest
        self.s = s + longest + 1
        state.n = int(state.lengths.max())


class _torch_attention:
    """While active and the batch has more than one row, a triton backend runs as sdpa: rows accept different numbers
    of drafts, which leaves holes in their masks that the kernels' left-padding description cannot express."""

    def __init__(self, *models_and_flag):
        *self.models, self.active = models_and_flag
        self.saved = []

    def __enter__(self):
        for model in self.models if self.active else ():
            if model.backend == "triton":
                self.saved.append((model, model._backend))
                model.backend = "sdpa"

    def __exit__(self, *exc):
        for model, backend in self.saved:
            model.backend = backend


def predicted_speedup(acceptance: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s estimate: expected tokens per iteration (1 - a^(k+1)) / (1 - a) over its cost k c + 1,
    with c the draft's forward time over the target's."""
    expected = k + 1 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return expected / (k * cost_ratio + 1) if math.isfinite(expected) else float("nan")
