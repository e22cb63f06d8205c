"""Training data: Dolly formatting and masking token by token, bad input, splits and batch order, token packing,
and the training-state files (atomic saves, pruning)."""

import errno
import json
import os

import numpy as np
import pytest
import torch

from gptneox.train.data import (IGNORE_INDEX, DataError, PackedTokens, add_dolly_tokens, batch_indices, collate,
                                count_targets, default_val_size, fetch_dolly15k, load_tokens, read_records,
                                split_indices, tokenize_records)
from gptneox.prompts.dolly import INTRO_BLURB
from gptneox.tokenizer import Tokenizer
from gptneox.train.state import load_state, save_state, state_files

INSTRUCTION = "Explain to me the difference between nuclear fission and fusion."
# The intro blurb and "\n\n" (535) as the 20B tokenizer encodes them (docs/architecture.md, "Dolly v2": 50278
# follows the intro's 535)
INTRO = [30003, 310, 271, 9775, 326, 8631, 247, 4836, 15, 19566, 247, 2380, 326, 20420, 29141, 253, 2748, 15, 535]


@pytest.fixture
def dolly_tok(shared_data):
    return Tokenizer.from_pretrained(os.path.join(shared_data, "dolly-tokenizer.json"))


@pytest.fixture
def pythia_tok(shared_data):
    return Tokenizer.from_pretrained(os.path.join(shared_data, "pythia-tokenizer.json"))


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def record(instruction="Say hi.", response="Hi.", context="", **kw):
    return json.dumps(dict(instruction=instruction, context=context, response=response, category="open_qa", **kw))


# ------------------------------------------------------------------------------------------- format and mask
def test_dolly_record_without_context_tokens_and_labels(dolly_tok):
    (ids, labels), = tokenize_records([dict(instruction=INSTRUCTION, context="", response="Fission splits atoms.")],
                                      dolly_tok, 2048)[0]
    prompt = dolly_tok.encode(f"{INTRO_BLURB}\n\n### Instruction:\n{INSTRUCTION}\n\n### Response:\n")
    assert len(prompt) == 35 and prompt[:19] == INTRO and prompt[19] == 50278 and prompt[-2:] == [535, 50279]
    response = [39, 1538, 36509, 10917, 15]  # "Fission splits atoms."
    assert ids == prompt + response + [535, 50277]  # "\n\n" then "### End"
    assert labels == [IGNORE_INDEX] * 35 + response + [535, 50277]


def test_dolly_record_with_context_tokens_and_labels(dolly_tok):
    (ids, labels), = tokenize_records([dict(instruction="Summarise.", context="Paris is in France.",
                                            response="It is.")], dolly_tok, 2048)[0]
    expected = INTRO + [50278, 187, 11808, 4175, 885, 15, 187, 187,  # "\nSummarise.\n\n" (the last \n joins Input)
                        8982, 27, 187, 36062, 310, 275, 6181, 15, 535,  # "Input:\nParis is in France.\n\n"
                        50279, 1147, 310, 15, 535, 50277]  # "### Response:\n" "It is." "\n\n" "### End"
    assert ids == expected
    k = ids.index(50279)
    assert labels[:k + 1] == [IGNORE_INDEX] * (k + 1) and labels[k + 1:] == [1147, 310, 15, 535, 50277]


def test_add_dolly_tokens_to_pythia_matches_dolly_tokenizer(pythia_tok, dolly_tok):
    assert not pythia_tok.is_dolly and len(pythia_tok) == 50277
    tok = add_dolly_tokens(pythia_tok)
    assert (tok.end_key_id, tok.instruction_key_id, tok.response_key_id, len(tok)) == (50277, 50278, 50279, 50280)
    assert not pythia_tok.is_dolly  # the caller's tokenizer is untouched
    recs = [dict(instruction=INSTRUCTION, context="", response="A ### End B"),
            dict(instruction="Q?", context="### Response: inside", response="r")]
    assert tokenize_records(recs, tok, 2048) == tokenize_records(recs, dolly_tok, 2048)
    assert add_dolly_tokens(dolly_tok) is dolly_tok


def test_mask_uses_first_response_key_token(dolly_tok):
    # a response key inside the instruction comes first: Dolly's collator masks up to the first one
    # (docs/architecture.md, "Dolly v2")
    (ids, labels), = tokenize_records([dict(instruction="Echo ### Response:\nplease", context="", response="ok")],
                                      dolly_tok, 2048)[0]
    first = ids.index(50279)
    assert ids.count(50279) == 2 and labels[:first + 1] == [IGNORE_INDEX] * (first + 1)
    assert labels[first + 1:] == ids[first + 1:]


def test_tokenize_records_drops_over_long_records_and_counts_them(dolly_tok):
    recs = [dict(instruction="Q", context="", response="short"), dict(instruction="Q", context="", response="x " * 300)]
    n_short = len(tokenize_records(recs[:1], dolly_tok, 2048)[0][0][0])
    examples, dropped = tokenize_records(recs, dolly_tok, n_short + 1)
    assert dropped == 1 and len(examples) == 1 and len(examples[0][0]) == n_short
    assert tokenize_records(recs[:1], dolly_tok, n_short)[1] == 1  # reaching max_len drops it, as Dolly


def test_tokenize_records_refuses_tokenizer_without_dolly_tokens(pythia_tok):
    with pytest.raises(DataError, match="add_dolly_tokens"):
        tokenize_records([dict(instruction="Q", context="", response="A")], pythia_tok, 2048)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("line, message", [
    ("{not json", "not a JSON object"),
    ('{"instruction": "a\tb"}', r"not a JSON object \(Invalid control character at column 19\)$"),  # not "at at"
    ('["a list"]', "expected a JSON object"),
    (json.dumps(dict(instruction="q", response="r")), "missing field 'context'"),
    (json.dumps(dict(instruction="q", context=None, response="r")), "field 'context' must be a string"),
    (record(response="  "), "empty 'response'"),
    (record(instruction=""), "empty 'instruction'"),
    (b'{"instruction": "caf\xe9", "context": "", "response": "r"}', "not valid UTF-8"),
])
def test_read_records_names_file_and_line_of_bad_input(tmp_path, line, message):
    path = write_lines(tmp_path / "d.jsonl", [record(), "", line, record()])
    with pytest.raises(DataError, match=message) as e:
        read_records(path)
    assert f"{path}:3:" in str(e.value)
    records, skipped = read_records(path, skip_bad_lines=True)
    assert skipped == 1 and len(records) == 2


def test_read_records_reads_dolly_fields(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [record("a", "b", "c"), record("d", "e")])
    records, skipped = read_records(path)
    assert skipped == 0 and [(r["instruction"], r["response"], r["context"]) for r in records] == \
        [("a", "b", "c"), ("d", "e", "")]


def test_fetch_dolly15k_uses_cache_and_explains_offline_failure(tmp_path, monkeypatch):
    cached = write_lines(tmp_path / "databricks-dolly-15k.jsonl", [record()])
    assert fetch_dolly15k(tmp_path) == cached
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="curl -L -o databricks-dolly-15k.jsonl") as e:
        fetch_dolly15k(tmp_path / "empty")
    assert "--data" in str(e.value) and not (tmp_path / "empty" / "databricks-dolly-15k.jsonl.part").exists()


# --------------------------------------------------------------------------------- splits, order, batches
def test_split_indices_is_seeded_disjoint_and_complete():
    train, val = split_indices(50, 5, seed=1)
    assert len(val) == 5 and sorted(train + val) == list(range(50))
    assert split_indices(50, 5, seed=1) == (train, val) and split_indices(50, 5, seed=2) != (train, val)
    with pytest.raises(DataError, match="--val-size 10"):
        split_indices(10, 10, seed=0)


def test_default_val_size_never_swallows_small_data():
    assert default_val_size(15011) == 200 and default_val_size(30) == 3 and default_val_size(5) == 0


def test_batch_indices_cover_each_epoch_in_a_new_order():
    n, bs = 10, 4  # 3 batches per epoch, the last filled up from the epoch's start
    epochs = [[batch_indices(n, bs, 7, e * 3 + k) for k in range(3)] for e in range(2)]
    for batches in epochs:
        assert all(len(b) == bs for b in batches)
        flat = sum(batches, [])
        assert sorted(flat[:n]) == list(range(n)) and flat[n:] == flat[:2]
    assert epochs[0] != epochs[1]
    assert batch_indices(n, bs, 7, 4) == epochs[1][1]  # a function of the step alone (resume)
    assert batch_indices(3, 5, 0, 0)[:3] == batch_indices(3, 5, 0, 0)[3:] + batch_indices(3, 5, 0, 0)[2:3]


def test_collate_pads_right_to_multiple_of_8_without_loss_on_padding():
    examples = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([1] * 10, [1] * 10)]
    ids, labels = collate(examples, pad_id=0)
    assert ids.shape == labels.shape == (2, 16)
    assert ids[0].tolist() == [5, 6, 7] + [0] * 13 and labels[0].tolist() == [IGNORE_INDEX, 6, 7] + [IGNORE_INDEX] * 13
    assert count_targets(examples) == 2 + 9


# ------------------------------------------------------------------------------------------------ packing
def test_load_tokens_memory_maps_bin_and_npy(tmp_path):
    tokens = np.arange(100, dtype=np.uint16) * 500
    tokens.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", tokens)
    for name in ("t.bin", "t.npy"):
        arr = load_tokens(tmp_path / name)
        assert isinstance(arr, np.memmap) and np.array_equal(arr, tokens)
    packed = PackedTokens(load_tokens(tmp_path / "t.bin"), 32)
    assert len(packed) == 3 and packed[2] == (tokens[64:96].tolist(), tokens[64:96].tolist())
    with pytest.raises(IndexError):
        packed[3]


def test_load_tokens_rejects_malformed_token_files(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="odd.bin: size 3 bytes is odd"):
        load_tokens(tmp_path / "odd.bin")
    np.save(tmp_path / "i32.npy", np.arange(4, dtype=np.int32))
    with pytest.raises(DataError, match="i32.npy: expected a 1-D uint16 array"):
        load_tokens(tmp_path / "i32.npy")
    with pytest.raises(DataError, match="fewer than one sequence of --seq-len 64"):
        PackedTokens(np.zeros(10, dtype=np.uint16), 64, "tiny.bin")


def test_load_tokens_encodes_text_and_ends_with_eod(tmp_path, pythia_tok):
    (tmp_path / "a.txt").write_text("My favorite food is")
    # docs/architecture.md, "Tokenizer"
    assert load_tokens(tmp_path / "a.txt", pythia_tok).tolist() == [3220, 7583, 2739, 310, 0]
    (tmp_path / "b.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"b.txt:2: not valid UTF-8"):
        load_tokens(tmp_path / "b.txt", pythia_tok)
    with pytest.raises(DataError, match="needs a tokenizer"):
        load_tokens(tmp_path / "a.txt")


# ----------------------------------------------------------------------------------------- training state
def test_save_state_keeps_newest_and_loads_back(tmp_path):
    for step in (2, 4, 6, 8):
        save_state(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    assert [p.name for p in state_files(tmp_path)] == ["step-00000006.pt", "step-00000008.pt"]
    assert torch.equal(load_state(tmp_path / "step-00000008.pt")["w"], torch.full((3,), 8.0))


def test_save_state_interrupted_by_full_disk_keeps_previous(tmp_path, monkeypatch):
    save_state(tmp_path, 1, {"step": 1, "w": torch.ones(4)})
    real_save = torch.save

    def disk_full(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="step 2 .* previous checkpoint is untouched"):
        save_state(tmp_path, 2, {"step": 2, "w": torch.zeros(4)})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]  # no temporary file left behind
    assert load_state(tmp_path / "step-00000001.pt")["step"] == 1


def test_load_state_names_a_truncated_file(tmp_path):
    (tmp_path / "step-00000003.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="step-00000003.pt: unreadable training state"):
        load_state(tmp_path / "step-00000003.pt")
