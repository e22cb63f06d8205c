"""Generated ids to text: a row's completion up to its stop token or stop string, and the same text streamed piece
by piece as the row grows, never split inside a multi-byte character or a possible stop string."""

from collections.abc import Sequence


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
