"""Ragged forwards: the tokens of many sequences packed into one row, each sequence at its own columns of its own
cache row. The serving engine runs each step so (every running request's next token and chunks of new prompts in one
forward, which reads the weights once).

    ragged = Ragged([(row, start, n), ...], device)     # in packed order: n tokens of cache row `row`, at its
                                                        # columns start..start+n-1 (also their rotary positions)
    logits = model(ids [1, N], position_ids=ragged.position_ids, attention_mask=ragged,
                   cache=ragged.views(cache), logits_to_keep=positions)    # cache: per layer [rows, nh, L, hs]

Each layer's cache view (RaggedView) writes packed token i's key and value at (ragged.rows[i], ragged.columns[i]) and returns the
whole cache, [rows, nh, L, hs]; attention() then computes for each sequence what a forward of that sequence alone
computes: its queries against its own row's columns 0..start+n-1, causally. One-token sequences (decode steps) run
together in one call over the cache rows lo..hi-1 they span (a row between them without a token gets a dummy query
whose output is dropped); longer ones one call each. Shapes: N packed tokens, nh heads, hs head size, L columns.
"""

import torch

from .reference import sdpa_attention


class Ragged:
    """The sequences of one packed forward: [(row, start, n)], in the order of their tokens. A row at most once."""

    def __init__(self, seqs, device):
        self.seqs = [(int(row), int(start), int(n)) for row, start, n in seqs]
        rows, columns, self.chunks, decode, offset = [], [], [], [], 0
        for row, start, n in self.seqs:
            if n < 1 or start < 0:
                raise ValueError(f"a ragged sequence needs n >= 1 tokens at columns >= 0, got {(row, start, n)}")
            rows += [row] * n
            columns += range(start, start + n)
            (decode.append((offset, row, start)) if n == 1 else self.chunks.append((offset, n, row, start)))
            offset += n
        if len(set(rows)) != len(self.seqs):
            raise ValueError("a ragged forward holds each cache row at most once")
        self.N = offset
        self.rows = torch.tensor(rows, device=device)  # [N]
        self.columns = torch.tensor(columns, device=device)  # [N]
        self.position_ids = self.columns[None]  # [1, N]
        self.decode = self._decode(decode, device) if decode else None

    def views(self, cache) -> list["RaggedView"]:
        """The model's cache argument for this forward: one RaggedView per layer of cache (KVCaches, [rows, nh, L,
        hs] each)."""
        return [RaggedView(layer, self) for layer in cache]

    @staticmethod
    def _decode(decode, device):
        """(lo, hi, W, offsets [m], present [hi - lo], mask [hi - lo, 1, 1, W]) of the one-token sequences."""
        lo, hi = min(r for _, r, _ in decode), max(r for _, r, _ in decode) + 1
        W = max(c for _, _, c in decode) + 1
        last = torch.zeros(hi - lo, dtype=torch.long)  # a row without a token sees column 0 alone
        present = torch.zeros(hi - lo, dtype=torch.bool)
        for _, row, column in decode:
            last[row - lo], present[row - lo] = column, True
        offsets = torch.tensor([o for o, _, _ in sorted(decode, key=lambda d: d[1])], device=device)
        mask = (torch.arange(W)[None] <= last[:, None])[:, None, None].to(device)  # [R, 1, 1, W]
        return lo, hi, W, offsets, present.to(device), mask


class RaggedView:
    """One layer's cache as the model's forward uses it in a ragged forward: packed token i writes its key and value
    at (rows[i], columns[i]); attention gets the whole cache."""

    def __init__(self, layer, ragged: Ragged):
        self.k_cache, self.v_cache, self.ragged = layer.k_cache, layer.v_cache, ragged
        self.max_len = layer.k_cache.shape[2]

    def update(self, input_pos, k, v):  # k, v [1, nh, N, hs]; the packed tokens' places are the Ragged's
        rows, columns = self.ragged.rows, self.ragged.columns
        self.k_cache[rows, :, columns] = k[0].transpose(0, 1).to(self.k_cache.dtype)  # indexed as [N, nh, hs]
        self.v_cache[rows, :, columns] = v[0].transpose(0, 1).to(self.v_cache.dtype)
        return self.k_cache, self.v_cache


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ragged: Ragged) -> torch.Tensor:
    """q [1, nh, N, hs] of the packed tokens, k and v the whole cache [rows, nh, L, hs] -> y [1, nh, N, hs]."""
    out = torch.empty_like(q)
    if ragged.decode is not None:
        lo, hi, W, offsets, present, mask = ragged.decode
        qd = q.new_zeros(hi - lo, q.shape[1], 1, q.shape[3])  # [R, nh, 1, hs]
        qd[present] = q[0, :, offsets].transpose(0, 1)[:, :, None]  # rows in order: offsets are sorted by row
        yd = sdpa_attention(qd, k[lo:hi, :, :W], v[lo:hi, :, :W], mask)  # [R, nh, 1, hs]
        out[0, :, offsets] = yd[present][:, :, 0].transpose(0, 1)
    for offset, n, row, start in ragged.chunks:
        S = start + n
        causal = None if start == 0 else torch.ones(n, S, dtype=torch.bool, device=q.device).tril(start)[None, None]
        out[:, :, offset:offset + n] = sdpa_attention(q[:, :, offset:offset + n], k[row:row + 1, :, :S],
                                                      v[row:row + 1, :, :S], causal)
    return out
