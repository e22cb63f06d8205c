"""Training data: Dolly instruction records (JSON lines) with response-only labels, and raw text or token files
packed into fixed-length sequences for pretraining.

An example is a pair (input_ids, labels) of equal-length int lists; labels are -100 where no loss is taken. Batches
are chosen by step alone (a seeded permutation per epoch), so a resumed run sees exactly the batches it would have.
Dolly's recipe: docs/architecture.md, "Dolly v2" (databrickslabs/dolly training/trainer.py).
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

from .. import progress as progress_bars
from ..prompts.dolly import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL, format_training
from ..tokenizer import Tokenizer

IGNORE_INDEX = -100  # HF's ignored label
FIELDS = ("instruction", "context", "response")  # databricks-dolly-15k; "category" is optional and unused
DOLLY_15K = "dolly-15k"  # the --data name of the real dataset
DOLLY_15K_URL = ("https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/"
                 "databricks-dolly-15k.jsonl")
INSTRUCTION_FILES = (".jsonl", ".json")  # JSON lines of {instruction, context, response}
TOKEN_FILES = (".bin", ".npy")  # uint16 token ids, memory-mapped (the 50k vocabulary fits in 16 bits)
DATA_FILES = (*INSTRUCTION_FILES, ".txt", *TOKEN_FILES)  # what --data may name, besides DOLLY_15K
PAD_TO_MULTIPLE = 8  # Dolly's DataCollatorForLanguageModeling(pad_to_multiple_of=8)


class DataError(ValueError):
    """Training data that cannot be used as it is; the message names the file (and line) at fault."""


# --------------------------------------------------------------------------------------- instruction records
def _parse_line(raw: bytes, where: str) -> dict:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
    except json.JSONDecodeError as e:  # some of json's messages end in " at" ("Invalid control character at")
        raise DataError(f"{where}: not a JSON object ({e.msg.removesuffix(' at')} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, found {type(rec).__name__}")
    for field in FIELDS:
        if field not in rec:
            raise DataError(f"{where}: missing field {field!r}")
        if not isinstance(rec[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, found {type(rec[field]).__name__}")
    for field in ("instruction", "response"):  # Dolly's loader refuses these empty too
        if not rec[field].strip():
            raise DataError(f"{where}: empty {field!r}")
    return rec


def read_records(path, *, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """Records of a databricks-dolly-15k style JSON-lines file, and how many bad lines were skipped.

    A bad line (not UTF-8, not JSON, a missing or non-string field, an empty instruction or response) raises
    DataError naming the file and line, or is counted and skipped with skip_bad_lines. Blank lines are ignored.
    """
    path = Path(path)
    records, skipped = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                records.append(_parse_line(raw, f"{path}:{lineno}"))
            except DataError:
                if not skip_bad_lines:
                    raise
                skipped += 1
    return records, skipped


def fetch_dolly15k(cache_dir, *, progress: bool = False) -> Path:
    """The databricks-dolly-15k JSON-lines file, downloaded once into cache_dir (atomically) and reused."""
    cache_dir = Path(cache_dir)
    file = cache_dir / "databricks-dolly-15k.jsonl"
    if file.exists():
        return file
    import urllib.error
    import urllib.request
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".part")
    try:
        with urllib.request.urlopen(DOLLY_15K_URL, timeout=30) as r, open(tmp, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = progress_bars.bar(total=total, desc="dolly-15k", unit="B", unit_scale=True, enabled=progress)
            while chunk := r.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
            bar.close()
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download databricks-dolly-15k ({e}). Without network, fetch it elsewhere "
                        f"(`curl -L -o databricks-dolly-15k.jsonl {DOLLY_15K_URL}`) and either copy it to {file} "
                        "or pass its path as --data") from None
    tmp.replace(file)
    return file


def add_dolly_tokens(tok: Tokenizer) -> Tokenizer:
    """A tokenizer with Dolly's three special tokens (ids 50277-50279 after the 20B vocabulary); unchanged if present.

    Order and spelling as Dolly's load_tokenizer: [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]
    (docs/architecture.md, "Dolly v2").
    """
    if tok.is_dolly:
        return tok
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    backend = HFTokenizer.from_str(tok.backend.to_str())  # a copy: the caller's tokenizer is left alone
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL)])
    return Tokenizer(backend, tok.source)


def mask_prompt(ids: list[int], response_key_id: int) -> list[int]:
    """Labels for a formatted record: -100 up to and including the first response-key token (Dolly's collator)."""
    try:
        i = ids.index(response_key_id)
    except ValueError:
        raise DataError(f"record has no response-key token {response_key_id}: was the tokenizer given Dolly's "
                        "special tokens (add_dolly_tokens)?") from None
    return [IGNORE_INDEX] * (i + 1) + ids[i + 1:]


def tokenize_records(records: list[dict], tok: Tokenizer, max_len: int) -> tuple[list[tuple], int]:
    """(input_ids, labels) for each record in Dolly's training template, and the number dropped as over-long.

    As Dolly, a record whose tokens reach max_len is dropped whole (never truncated, so "### End" stays).
    """
    if not tok.is_dolly:
        raise DataError(f"{tok.source}: tokenizer lacks Dolly's special tokens; call add_dolly_tokens first")
    texts = [format_training(r["instruction"], r["response"], r["context"] or None) for r in records]
    examples, dropped = [], 0
    for ids in tok.encode_batch(texts):
        if len(ids) >= max_len:
            dropped += 1
            continue
        examples.append((ids, mask_prompt(ids, tok.response_key_id)))
    return examples, dropped


# ---------------------------------------------------------------------------------------------- pretraining
def load_tokens(path, tok: Tokenizer | None = None) -> np.ndarray:
    """Token ids of a pretraining file: .bin (raw uint16) and .npy (uint16) are memory-mapped; .txt is encoded
    with tok and ends with <|endoftext|> (documents are joined by EOD, as the Pile is for Pythia)."""
    path = Path(path)
    if path.suffix == ".bin":
        if path.stat().st_size % 2:
            raise DataError(f"{path}: size {path.stat().st_size} bytes is odd; expected raw uint16 token ids")
        return np.memmap(path, dtype=np.uint16, mode="r")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise DataError(f"{path}: not a readable .npy file ({e})") from None
        if arr.dtype != np.uint16 or arr.ndim != 1:
            raise DataError(f"{path}: expected a 1-D uint16 array of token ids, found {arr.ndim}-D {arr.dtype}")
        return arr
    if tok is None:
        raise DataError(f"{path}: a text file needs a tokenizer (--tokenizer, or one in the --init checkpoint)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None
    return np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.uint16)


class PackedTokens:
    """Non-overlapping windows of seq_len tokens over a token array; each example is (ids, ids) (HF's run_clm)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, source: str = "tokens"):
        if len(tokens) < seq_len:
            raise DataError(f"{source}: {len(tokens)} tokens, fewer than one sequence of --seq-len {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64).tolist()
        return ids, ids


# ----------------------------------------------------------------------------------- splits, order, batches
def default_val_size(n: int) -> int:
    """Dolly's 200 held-out records, but never more than a tenth of a small dataset."""
    return min(200, n // 10)


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded shuffle of range(n) cut into (train, val); val_size must leave at least one training example."""
    if not 0 <= val_size < n:
        raise DataError(f"--val-size {val_size} must be >= 0 and leave at least one of the {n} examples to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[val_size:], perm[:val_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of global batch `step` (0-based): epoch e's seeded permutation, cut into batches; the last
    batch of an epoch is filled up from the start of the same permutation, so every batch has batch_size."""
    epoch, k = divmod(step, steps_per_epoch(n, batch_size))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    batch = perm[k * batch_size:(k + 1) * batch_size]
    while len(batch) < batch_size:  # only the epoch's last batch; n < batch_size repeats examples
        batch += perm[:batch_size - len(batch)]
    return batch


def collate(examples: list[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels [B, T], right-padded to a multiple of 8 (labels -100 on padding).

    Right padding needs no attention mask: a causal query never sees the padding keys after it.
    """
    T = max(len(ids) for ids, _ in examples)
    T = -(-T // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
    return input_ids, labels


def count_targets(examples: list[tuple]) -> int:
    """Tokens that carry loss after HF's shift (labels[1:] != -100): the normaliser of a global batch."""
    return sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for _, lab in examples)


# ------------------------------------------------------------------------------------------------- datasets
class Subset:
    """The examples of data at indices, in that order."""

    def __init__(self, data, indices):
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


def is_instruction_data(data: str) -> bool:
    return data == DOLLY_15K or Path(data).suffix in INSTRUCTION_FILES


def needs_tokenizer(data: str) -> bool:
    """Instruction records and text are tokenized; .bin / .npy files already hold token ids."""
    return is_instruction_data(data) or Path(data).suffix == ".txt"


def build_datasets(data: str, tok: Tokenizer | None, *, seq_len: int, val_size: int | None, seed: int,
                   skip_bad_lines: bool, cache_dir, progress: bool = False) -> tuple[Subset, Subset, str]:
    """(train, val, a one-line summary) from a --data value: "dolly-15k" (downloaded once into cache_dir) or a
    JSON-lines file of instruction records (Dolly's template, loss on the response), or .txt / .bin / .npy tokens
    packed into seq_len windows; val_size None takes default_val_size."""
    path = Path(data)
    if is_instruction_data(data):
        if tok is None:
            raise DataError("instruction data needs a tokenizer: --tokenizer, or a tokenizer.json in --init")
        if data == DOLLY_15K:
            path = fetch_dolly15k(cache_dir, progress=progress)
        records, skipped = read_records(path, skip_bad_lines=skip_bad_lines)
        examples, dropped = tokenize_records(records, tok, seq_len)
        summary = (f"{path}: {len(records)} records, {skipped} bad lines skipped, {dropped} dropped as longer than "
                   f"--seq-len {seq_len} - 1 tokens, {len(examples)} kept")
        if not examples:
            raise DataError(f"{path}: no record left to train on after filtering ({skipped} bad lines, {dropped} "
                            "over-long)")
    elif path.suffix in (".txt", *TOKEN_FILES):
        examples = PackedTokens(load_tokens(path, tok), seq_len, str(path))
        summary = f"{path}: {len(examples.tokens)} tokens, {len(examples)} sequences of {seq_len}"
    else:
        raise DataError(f"--data {data}: expected {DOLLY_15K!r}, a .jsonl/.json file of instruction records, "
                        "or pretraining text or tokens (.txt, .bin, .npy)")
    val_size = default_val_size(len(examples)) if val_size is None else val_size
    train, val = split_indices(len(examples), val_size, seed)
    return Subset(examples, train), Subset(examples, val), summary
