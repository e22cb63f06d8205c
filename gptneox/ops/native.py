"""C kernels built on the user's machine: the compiler, the instruction-set variants, a cached build.

    path = build(source, cc, flags)     # the shared library, compiled once per (source, compiler, flags)
    isa = cpu_isa()                     # "plain", "avx2" or "avx512": the best variant this CPU runs

A source is compiled with `$CC` (else cc / gcc / clang) into GPTNEOX_CACHE (default ~/.cache/gptneox) under a name
hashing the source, the compiler and the flags; the file is written to a temporary name and renamed, so two processes
building at once never load half a library. Each source reports the variant it was compiled for (its `gptneox_isa`),
so a compiler that ignores the flags is caught by the loader.
"""

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

ISAS = {  # the instruction-set variants, lowest first: their compiler flags (a source's gptneox_isa() is the index)
    "plain": [],  # plain C loops, right on every CPU (the compiler may still vectorise them for its target)
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mavx512vnni"],
}


def cache_dir() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("GPTNEOX_CACHE") or xdg / "gptneox")


def compiler() -> str | None:
    return os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def cpu_isa() -> str:
    """The best variant this CPU runs: what torch's dispatcher found (the test torch uses for its own kernels, so a
    hypervisor that hides AVX-512 hides it from both), plus VNNI where Linux reports it; lowered by GPTNEOX_CPU_ISA
    (plain, avx2, avx512, avx512vnni), never raised above what the CPU has."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    capability = torch.backends.cpu.get_cpu_capability() if x86 else ""
    best = {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "plain")
    if best == "avx512" and "avx512_vnni" in cpu_flags():  # torch does not report VNNI; Linux's flags do
        best = "avx512vnni"
    asked = os.environ.get("GPTNEOX_CPU_ISA", "").strip().lower()
    if not asked:
        return best
    if asked not in ISAS:
        raise ValueError(f"GPTNEOX_CPU_ISA={asked!r}: expected one of {', '.join(ISAS)}")
    names = list(ISAS)
    if names.index(asked) > names.index(best):
        warnings.warn(f"GPTNEOX_CPU_ISA={asked}: this CPU runs at most {best}; using {best}")
        return best
    return asked


def runnable() -> list[str]:
    """Every variant this CPU runs, lowest first, up to cpu_isa() (what the tests check one by one)."""
    names = list(ISAS)
    return names[:names.index(cpu_isa()) + 1]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def build(source: Path, cc: str, flags: list[str]) -> Path:
    """Compile source with these flags into the cache (once per source, compiler and flags); the library's path."""
    command = shlex.split(cc)  # CC may carry a wrapper or flags ("ccache gcc")
    version = subprocess.run([*command, "--version"], check=False, capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), cc, version, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*command, *flags, str(source), "-o", tmp], check=False, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cc} {' '.join(flags)} {source} failed:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache from loading it
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, isa: str | None, signatures: dict, fallback: str, extra: tuple = ()) -> ctypes.CDLL | None:
    """source built for this variant (None: cpu_isa()) and bound: signatures maps each function's name to (argument
    types, return type); extra: more compiler flags. None, with one warning ending in fallback (what runs instead),
    where GPTNEOX_CPU_KERNEL=0, no compiler, or a failed build; without OpenMP (Apple's clang) it is built for one
    thread, with a warning."""
    if os.environ.get("GPTNEOX_CPU_KERNEL", "1") == "0":
        return None
    isa = cpu_isa() if isa is None else isa
    cc = compiler()
    if cc is None:
        warnings.warn(f"no C compiler found (set CC): {fallback}")
        return None
    base = ["-O3", "-shared", "-fPIC", *ISAS[isa], *extra]
    try:
        try:
            lib = ctypes.CDLL(str(build(source, cc, base + ["-fopenmp"])))
        except (OSError, RuntimeError):  # no OpenMP, or its runtime missing: one thread
            lib = ctypes.CDLL(str(build(source, cc, base)))
            warnings.warn(f"{cc} has no OpenMP: {source.name} runs on one thread")
    except (OSError, RuntimeError) as e:
        warnings.warn(f"building {source.name} failed, so {fallback}: {e}")
        return None
    for name, (args, result) in {**signatures, "gptneox_isa": ([], ctypes.c_int)}.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    if lib.gptneox_isa() != list(ISAS).index(isa):  # a compiler that ignored the flags: say so (still correct)
        warnings.warn(f"{cc} built {source.name} for {list(ISAS)[lib.gptneox_isa()]}, not {isa}")
    return lib
