"""Progress bars for long work (loading, saving, converting, downloading, training): tqdm's, when it is installed
and the caller asks for one; otherwise a silent stand-in with the same methods, so callers never branch.

Library functions take progress=False by default (a library does not draw unasked); the scripts turn bars on unless
--no-progress. Messages printed while a bar is drawn go through write(), so they appear above the bar.
"""

import importlib.util
import sys


def available() -> bool:
    return importlib.util.find_spec("tqdm") is not None


def bar(iterable=None, *, total=None, desc=None, unit="it", enabled=True, **kwargs):
    """A tqdm bar over iterable (or one to update() by hand), or a silent one when disabled or tqdm is missing."""
    if not (enabled and available()):
        return _Silent(iterable)
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)


def write(message: str, file=None) -> None:
    """Print a line (stdout by default) above any bar being drawn, and flush it."""
    file = file or sys.stdout
    if available():
        from tqdm import tqdm
        tqdm.write(message, file=file)
    else:
        print(message, file=file)
    file.flush()


def one_line(text: str, width: int = 160) -> str:
    """text for a line of a log: quoted and escaped as Python's repr (a newline shows as \\n), cut to width
    characters with "..."."""
    shown = repr(text)
    return shown if len(shown) <= width else shown[:width - 3] + "..."


class _Silent:
    """What a tqdm bar offers, doing nothing."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass
