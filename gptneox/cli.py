"""The command-line dialect shared by train.py, sample.py, convert_weights.py and python -m gptneox.serve.

- Flags are dash-separated (--max-new-tokens); the underscore spelling (--max_new_tokens) is accepted as an alias.
- One set of dtype spellings everywhere: bf16 / bfloat16, fp16 / float16, fp32 / float32 (parse_dtype).
- A usage error (a flag value that cannot work, flags that contradict each other) exits with status 2 in argparse's
  format: the usage line, then "PROG: error: MESSAGE".
- A runtime error (a missing or corrupt file, bad data, a run that cannot go on, no memory) exits with status 1 and
  one line "PROG: error: MESSAGE", no traceback; GPTNEOX_TRACEBACK=1 shows the traceback instead. Ctrl-C exits 130.
"""

import argparse
import os
import sys

import torch

from .devices import DTYPES, DeviceError, auto_dtype, resolve_device, resolve_dtype

RUNTIME_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)  # torch.OutOfMemoryError is a RuntimeError


class UsageError(Exception):
    """A command line that cannot work as given; the script exits 2 with its usage line and this message."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """torch.dtype for one of the spellings in DTYPES (a torch.dtype passes through)."""
    return resolve_dtype(name)


def dtype_arg(allowed: tuple[str, ...] = tuple(DTYPES), extra: tuple[str, ...] = (), quantize_flag: str | None = None):
    """An argparse type: the dtype spellings of `allowed` (canonical names: bf16, fp16, fp32), plus `extra` words
    (such as "auto") returned as they are. The value is the canonical short name, e.g. "bf16". int8 / int4 are
    weights, not a dtype: the error points at quantize_flag (e.g. "--quantize") when the script has one."""
    short = {v: k for k, v in DTYPES.items() if len(k) == 4}  # torch.bfloat16 -> "bf16"

    def parse(text: str) -> str:
        if text in extra:
            return text
        if text in ("int8", "int4") and quantize_flag:
            raise argparse.ArgumentTypeError(f"{text} is a weight format, not a dtype: use {quantize_flag} {text} "
                                             "(--dtype stays the activations' float dtype)")
        spellings = [s for s in DTYPES if short[DTYPES[s]] in allowed]
        if text not in spellings:
            raise argparse.ArgumentTypeError(f"invalid dtype {text!r}; choose from {', '.join([*extra, *spellings])}")
        return short[DTYPES[text]]
    parse.__name__ = "dtype"
    return parse


def device_arg(text: str) -> str:
    """An argparse type for --device: "auto", or anything torch.device accepts (cpu, cuda, cuda:1, mps)."""
    if text == "auto":
        return text
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}; use auto, cpu, cuda or cuda:N") from None
    return text


def pick_device(device: str | None, flag: str = "--device") -> torch.device:
    """--device's torch.device (None or auto: cuda when there is a GPU, else cpu); a device this machine lacks is a
    usage error, the same line from every script (gptneox.devices.resolve_device)."""
    try:
        return resolve_device(device or "auto", name=flag)
    except DeviceError as e:
        raise UsageError(str(e)) from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """--dtype's torch.dtype; auto: gptneox.devices.auto_dtype (bf16 / fp16 on a GPU, fp32 on the CPU)."""
    return auto_dtype(device) if dtype == "auto" else parse_dtype(dtype)


def quantize_flags(quantize: str | None, group_size: int | None) -> int:
    """The int4 group size of --quantize / --group-size (default 128), after the rule every script shares:
    --group-size only with --quantize int4."""
    if quantize is None and group_size is not None:
        raise UsageError("--group-size is the int4 group size: give it with --quantize int4")
    if quantize == "int8" and group_size is not None:
        raise UsageError("--group-size: only with --quantize int4 (int8 has one scale per output channel)")
    return 128 if group_size is None else group_size


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """--threads N: torch's CPU threads for this run (set_threads)."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch's operators (default: torch's own choice, one per physical core). "
                        "Fewer threads are often faster on a busy machine, or for a small model whose operators are "
                        "too short to share out: try 1")


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else '>= 0'}, got {value}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's dialect: --flag_name is read as --flag-name, help shows defaults' meaning."""

    def __init__(self, doc: str, **kw):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._dashed(a) for a in args], namespace)

    def _dashed(self, arg: str) -> str:
        """--max_new_tokens[=V] -> --max-new-tokens[=V] when that is one of our flags."""
        if not arg.startswith("--") or "_" not in arg.split("=", 1)[0]:
            return arg
        flag, sep, value = arg.partition("=")
        dashed = "--" + flag[2:].replace("_", "-")
        known = dashed in self._option_string_actions and flag not in self._option_string_actions
        return dashed + sep + value if known else arg


def run(main, parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse argv, call main(**args) and return the dialect's exit status for what happened (see the module doc);
    usage errors print argparse's usage line and message."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (2) or --help (0), already printed by argparse
        return e.code
    try:
        main(**vars(args))
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # its message, if any, says where the work stopped (train.py: how to resume)
        print(e.args[0] if e.args else "", file=sys.stderr)
        return 130
    except RUNTIME_ERRORS as e:
        if os.environ.get("GPTNEOX_TRACEBACK"):
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
