"""The GPT-NeoX-20B byte-level BPE tokenizer (Pythia, Dolly) over the `tokenizers` library and a tokenizer.json.

Encodings are the tokenizer.json's own (NFC, ByteLevel without prefix space, whitespace-run tokens split out
before BPE), which is what transformers' GPTNeoXTokenizer(Fast) produces: no BOS or EOS is added.
Facts: docs/architecture.md, "Tokenizer" and "Dolly v2".
"""

from tokenizers import Tokenizer as _HFTokenizer

from .hub import checkpoint_path
from .prompts.dolly import (  # Dolly's special tokens: ids 50277-50279 in its file
    END_KEY,
    INSTRUCTION_KEY,
    RESPONSE_KEY,
)

EOS = "<|endoftext|>"  # id 0: EOD, eos and bos of every Pythia / Dolly model
PAD = "<|padding|>"  # id 1


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, source: str = "tokenizer"):
        self.backend = backend
        self.source = source
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        self.eos_id = added.get(EOS, 0)
        self.bos_id = self.eos_id
        self.pad_id = added.get(PAD, self.eos_id)
        self.end_key_id = added.get(END_KEY)
        self.instruction_key_id = added.get(INSTRUCTION_KEY)
        # the response key is "### Response:\n" in Dolly v2's files, "### Response:" in some others: match the prefix
        self.response_key_id = next((i for s, i in added.items() if s.startswith(RESPONSE_KEY)), None)

    @property
    def eos_token_id(self) -> int:  # transformers' name
        return self.eos_id

    @property
    def pad_token_id(self) -> int:  # transformers' name
        return self.pad_id

    @property
    def bos_token_id(self) -> int:  # transformers' name
        return self.bos_id

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision=None) -> "Tokenizer":
        """From a tokenizer.json file, a checkpoint directory holding one, or a model name (and revision) found or
        fetched as GPTNeoX.from_pretrained does: "pythia-70m@step3000", or "pythia-70m" with revision="step3000"."""
        path = checkpoint_path(name_or_path, revision=revision)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: tokenizer file not found")
        try:
            return cls(_HFTokenizer.from_file(str(file)), str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None

    def save(self, path) -> None:
        """Write the tokenizer.json (with any added tokens) to path."""
        self.backend.save(str(path))

    @property
    def is_dolly(self) -> bool:
        """True when the Dolly instruction tokens are present (its generation prompt applies)."""
        return None not in (self.end_key_id, self.instruction_key_id, self.response_key_id)

    @property
    def vocab_size(self) -> int:  # entries including added tokens (50277 Pythia, 50280 Dolly), not the padded rows
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text for ids; ids past the tokenizer (the model's vocab padding rows) decode to nothing."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([[int(i) for i in ids] for ids in batch],
                                         skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    def __len__(self) -> int:
        return self.vocab_size
