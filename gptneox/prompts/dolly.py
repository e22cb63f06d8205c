"""Dolly v2's instruction format: the training and generation prompts, and the response extractor.

Strings are databrickslabs/dolly training/consts.py's, character for character (docs/architecture.md, "Dolly v2").
"""

import re

INTRO_BLURB = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.")
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"  # no "###" (Dolly's own spelling)
RESPONSE_KEY = "### Response:"
END_KEY = "### End"
RESPONSE_KEY_NL = RESPONSE_KEY + "\n"


def format_prompt(instruction: str, context: str | None = None) -> str:
    """The generation prompt; it ends with the response key and its newline, where the answer starts.

    Dolly's generation template has no input block: a context goes inside the instruction as
    "{instruction}\\n\\nInput:\\n{context}" (databrickslabs/dolly examples/langchain.py).
    """
    if context:
        instruction = f"{instruction}\n\n{INPUT_KEY}\n{context}"
    return f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{RESPONSE_KEY_NL}"


def format_training(instruction: str, response: str, context: str | None = None) -> str:
    """A training record: prompt, response, then the end key (with the input block when there is a context)."""
    input_block = f"{INPUT_KEY}\n{context}\n\n" if context else ""
    return (f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{input_block}"
            f"{RESPONSE_KEY_NL}{response}\n\n{END_KEY}")


def extract_response(text: str) -> str:
    """The answer in a generated text: between the response key and "### End" (or the end), stripped.

    Mirrors Dolly's pipeline post-processing (training/generate.py), which falls back to these regexes
    when the special-token ids are not at hand; text without a response key is returned stripped.
    """
    m = re.search(r"#+\s*Response:\s*(.+?)#+\s*End", text, flags=re.DOTALL)
    if m is None:
        m = re.search(r"#+\s*Response:\s*(.+)", text, flags=re.DOTALL)
    return (m.group(1) if m else text).strip()
