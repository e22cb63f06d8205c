"""Tokenizer: identical ids to transformers' tokenizer on the real Pythia and Dolly tokenizer.json files."""

import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gptneox import Tokenizer

TEXTS = [
    "",
    "My favorite food is",
    "Hello world!",
    "a    b",
    "        def f(x):\n            return x  # 8- and 12-space indents",
    "caf\u00e9 vs cafe\u0301 (NFC: the same ids)",
    "日本語のテキスト, emoji 🤗🚀, Ünïcödé",
    "<|endoftext|>hi<|padding|>",
    "### Instruction:\nSay hi\n\n### Response:\nhi\n\n### End",
    "\n\n\t\t  trailing spaces   ",
    "<|im_start|>system\nA chat between",
]


@pytest.fixture(scope="module", params=["pythia", "dolly"])
def pair(request, shared_data):
    from transformers import PreTrainedTokenizerFast
    file = os.path.join(shared_data, f"{request.param}-tokenizer.json")
    return Tokenizer.from_pretrained(file), PreTrainedTokenizerFast(tokenizer_file=file)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_equal_transformers(pair, text):
    ours, hf = pair
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids)


@given(text=st.text(max_size=60))
@example(text="x" + " " * 30 + "y")
@example(text="e\u0301\u0301 \u212b")
def test_tokenizer_ids_equal_transformers_on_any_text(pair, text):
    ours, hf = pair
    assert ours.encode(text) == hf(text)["input_ids"]


def test_tokenizer_known_vectors(shared_data):
    tok = Tokenizer.from_pretrained(os.path.join(shared_data, "pythia-tokenizer.json"))
    assert tok.encode("My favorite food is") == [3220, 7583, 2739, 310]
    assert tok.encode("Hello world!") == [12092, 1533, 2]
    assert tok.encode("a    b") == [66, 50274, 67]
    assert tok.encode("\n\n") == [535]
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")
    assert (tok.eos_id, tok.bos_id, tok.pad_id, len(tok)) == (0, 0, 1, 50277)
    assert not tok.is_dolly and tok.end_key_id is None
    assert tok.encode_batch(["Hello world!", ""]) == [[12092, 1533, 2], []]
    assert tok.decode([12092, 1533, 2, 50300]) == "Hello world!"  # a vocab padding row decodes to nothing


def test_tokenizer_dolly_special_tokens(shared_data):
    tok = Tokenizer.from_pretrained(os.path.join(shared_data, "dolly-tokenizer.json"))
    assert (tok.end_key_id, tok.instruction_key_id, tok.response_key_id, len(tok)) == (50277, 50278, 50279, 50280)
    assert tok.is_dolly
    ids = tok.encode("### Response:\nhi\n\n### End")
    assert ids[0] == 50279 and ids[-1] == 50277
    assert tok.decode(ids, skip_special_tokens=True) == "hi\n\n"
    assert tok.decode_batch([[12092], [1533]]) == ["Hello", " world"]


def test_tokenizer_from_directory_and_bad_files(shared_data, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(shared_data, "dolly-tokenizer.json"), "rb").read())
    assert Tokenizer.from_pretrained(tmp_path).is_dolly
    with pytest.raises(FileNotFoundError, match="missing: tokenizer file not found"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match="bad.json: not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "bad.json")


def test_tokenizer_has_transformers_id_names(shared_data):
    tok = Tokenizer.from_pretrained(os.path.join(shared_data, "pythia-tokenizer.json"))
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 0, 1)
