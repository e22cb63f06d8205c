"""`python -m gptneox.eval`: lm-eval's own command line with the model "gptneox" (lm.py) chosen for it."""

import os
import sys

from ..cli import RUNTIME_ERRORS, UsageError, pick_device
from .lm import MODEL_ARGS_HELP, MODEL_NAME


def _flag_value(args: list[str], *names: str) -> str | None:
    for k, arg in enumerate(args):
        for name in names:
            if arg == name and k + 1 < len(args):
                return args[k + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def usage() -> str:
    """What gptneox adds to lm-eval's command line; `--help` prints it before lm-eval's own help."""
    width = max(map(len, MODEL_ARGS_HELP))
    rows = "\n".join(f"  {k:<{width}}  {v}" for k, v in MODEL_ARGS_HELP.items())
    return ("usage: python -m gptneox.eval --model_args pretrained=NAME_OR_DIR[,KEY=VALUE...] --tasks TASKS "
            "[lm-eval's flags]\n\n"
            f"lm-evaluation-harness with gptneox's model (--model {MODEL_NAME}, set for you; --device auto unless "
            "given).\nExit status: 0 done, 2 a usage error, 1 a runtime error (one line; GPTNEOX_TRACEBACK=1 shows the "
            "traceback). Guide: docs/evaluation.md.\n\n"
            f"--model_args of {MODEL_NAME}, comma-separated KEY=VALUE:\n{rows}\n\n"
            "lm-eval's own flags follow.\n")


def _model_args_device(args: list[str]) -> str | None:
    """device=... inside --model_args (lm-eval's KEY=VALUE,KEY=VALUE string), or None."""
    text = _flag_value(args, "--model_args", "--model-args", "-a") or ""
    pairs = dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)
    return pairs.get("device")


def main(argv=None) -> int:
    """`python -m gptneox.eval ARGS`: lm-eval's own command line (`lm_eval run --help` lists its flags) with
    --model gptneox and, unless given, --device auto. Errors from the model exit 1 with one line (GPTNEOX_TRACEBACK=1
    shows the traceback), usage errors 2, as gptneox's other commands."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        args = args[1:]
    if "-h" in args or "--help" in args:
        print(usage(), flush=True)
    model = _flag_value(args, "--model", "-M")
    if model not in (None, MODEL_NAME):
        print(f"gptneox.eval: error: --model {model}: this command evaluates --model {MODEL_NAME}; run lm_eval itself "
              "for other models", file=sys.stderr)
        return 2
    if model is None:
        args = ["--model", MODEL_NAME, *args]
    if _flag_value(args, "--device") is None:
        args += ["--device", "auto"]
    try:  # the device rule of every gptneox command, before lm-eval loads anything
        pick_device(_flag_value(args, "--device"))
        pick_device(_model_args_device(args), flag="--model_args device=")
    except UsageError as e:
        print(f"gptneox.eval: error: {e}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate
    argv0, sys.argv = sys.argv, ["lm-eval", *args]  # lm-eval parses sys.argv itself
    try:
        cli_evaluate()
    except RUNTIME_ERRORS as e:
        if os.environ.get("GPTNEOX_TRACEBACK"):
            raise
        print(f"gptneox.eval: error: {e}", file=sys.stderr)
        return 1
    finally:
        sys.argv = argv0
    return 0
