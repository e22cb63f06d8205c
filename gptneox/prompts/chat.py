"""Chat messages to one prompt, for the server's /v1/chat/completions (docs/serving.md, "Chat templates").

Dolly v2 is an instruction model, not a chat model, so a conversation becomes one Dolly instruction prompt: the last
message (the user's) is the instruction, and whatever came before it (system messages, earlier turns) goes in Dolly's
"Input:" block as context, one paragraph per message. The answer ends at "### End" and is stripped, as Dolly's
pipeline strips it. A base Pythia model gets a plain transcript that ends with "Assistant:", and its answer ends
where the model starts the user's next turn (PLAIN_STOP). Messages are (role, content) pairs, roles in ROLES.
"""

from collections.abc import Sequence

from .dolly import format_prompt

ROLES = ("system", "user", "assistant")
NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = ("\nUser:",)  # the plain template's answers end where the model writes the user's next turn


def _check(messages: Sequence[tuple[str, str]]) -> None:
    if not messages:
        raise ValueError("messages is empty: give at least one user message")
    for role, _ in messages:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    if messages[-1][0] != "user":
        raise ValueError(f"the last message must be the user's (the instruction to answer), not {messages[-1][0]!r}")


def dolly_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """Dolly's generation prompt: the last user message as the instruction, the messages before it as its context
    ("Role: content" paragraphs; a system message alone is the context as it is)."""
    _check(messages)
    *before, (_, instruction) = messages
    if len(before) == 1 and before[0][0] == "system":
        context = before[0][1]
    else:
        context = "\n\n".join(f"{NAMES[role]}: {content}" for role, content in before)
    return format_prompt(instruction.strip(), context.strip() or None)


def plain_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """"System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nUser: ...\\n\\nAssistant:" for a base model."""
    _check(messages)
    return "".join(f"{NAMES[role]}: {content.strip()}\n\n" for role, content in messages) + "Assistant:"


class Stripped:
    """A streamed answer without its leading and trailing whitespace (Dolly's pipeline strips its response; the plain
    template's answer starts after "Assistant:"): feed() the pieces as they come; trailing whitespace is held back
    until more text follows it, and dropped at the end."""

    def __init__(self):
        self.started, self.pending = False, ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        piece = self.pending + piece
        kept = piece.rstrip()
        self.pending = piece[len(kept):]
        return kept
