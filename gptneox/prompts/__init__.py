"""prompts: the text around a request. dolly.py: Dolly v2's instruction format; chat.py: chat messages as one prompt."""
