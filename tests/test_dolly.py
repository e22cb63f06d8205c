"""Dolly v2's prompt format, character for character against databrickslabs/dolly (docs/architecture.md, "Dolly v2")."""

import os

from gptneox import Tokenizer, extract_response, format_prompt
from gptneox.prompts.dolly import format_training

INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.")


def test_dolly_generation_prompt_is_dollys_string():
    assert format_prompt("Explain to me the difference between nuclear fission and fusion.") == (
        INTRO + "\n\n### Instruction:\nExplain to me the difference between nuclear fission and fusion.\n\n"
        "### Response:\n")


def test_dolly_generation_prompt_puts_context_in_the_instruction():
    assert format_prompt("Summarize.", "Paris is the capital of France.") == (
        INTRO + "\n\n### Instruction:\nSummarize.\n\nInput:\nParis is the capital of France.\n\n### Response:\n")
    assert format_prompt("Summarize.", "") == format_prompt("Summarize.")


def test_dolly_training_records_match_both_templates():
    assert format_training("Say hi.", "Hi!") == (
        INTRO + "\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!\n\n### End")
    assert format_training("Say hi.", "Hi!", context="to Bob") == (
        INTRO + "\n\n### Instruction:\nSay hi.\n\nInput:\nto Bob\n\n### Response:\nHi!\n\n### End")


def test_dolly_extract_response():
    text = format_prompt("Q?") + "  The answer.\n\n### End trailing"
    assert extract_response(text) == "The answer."
    assert extract_response(format_prompt("Q?") + "Unfinished answer") == "Unfinished answer"
    assert extract_response("no template at all \n") == "no template at all"


def test_dolly_prompt_encodes_as_in_the_spec(shared_data):
    """35 ids ending ..., 15, 535, 50279, with 50278 after the intro's 535 (docs/architecture.md, "Dolly v2")."""
    tok = Tokenizer.from_pretrained(os.path.join(shared_data, "dolly-tokenizer.json"))
    ids = tok.encode(format_prompt("Explain to me the difference between nuclear fission and fusion."))
    assert len(ids) == 35 and ids[-3:] == [15, 535, 50279]
    assert ids[ids.index(535) + 1] == 50278
