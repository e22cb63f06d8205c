"""The repository's scripts (sample.py, train.py, convert_weights.py) run in the test's own process, as
`python SCRIPT ARGS` runs them (runpy, as __main__), for checks of their flags that need no fresh interpreter; each
script's end-to-end runs in a fresh process are in its own test module."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(capsys, script: str, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ROOT/script with argv."""
    saved = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return status, out, err
