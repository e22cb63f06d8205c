"""Replace a directory whole or not at all: build the new one beside it under a hidden name, then swap.

    with atomic_dir(dst) as tmp:   # write into tmp; on success tmp becomes dst, on any failure it is deleted
        ...

The swap is two renames (dst aside as .NAME.old-PID, then .NAME.tmp-PID to dst). Whatever a process killed at any
point leaves beside dst is recovered by the next atomic_dir on the same dst (recover_interrupted): a killed writer's
temporary is deleted, and a dst caught between the two renames is put back. A live writer's entries are never
touched. Used by save_pretrained, convert_weights.py and train.py's export.
"""

import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def _leftovers(dst: Path) -> list[tuple[str, int, Path]]:
    """("tmp" or "old", pid, path) for each `.{dst.name}.tmp-PID` / `.old-PID` entry that atomic_dir left beside dst."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-(\d+)")
    matches = ((pattern.fullmatch(p.name), p) for p in dst.parent.iterdir()) if dst.parent.is_dir() else ()
    return [(m.group(1), int(m.group(2)), p) for m, p in matches if m]


def _alive(pid: int) -> bool:
    """Whether another process with this pid runs. Our own pid counts as dead: its leftovers are an earlier run's
    (pids are reused, e.g. in containers), since one process does not write the same dst twice at once."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def _remove(path: Path):
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover_interrupted(dst) -> None:
    """Undo what a killed atomic_dir(dst) left beside dst; entries of a live process are never touched.

    A dead process's `.old-PID` is the previous dst, moved aside for the final swap: if dst is missing (killed
    between the two renames) it is put back first; otherwise it, like any dead process's `.tmp-PID`, is deleted.
    """
    dst = Path(dst)
    dead = sorted((p for _, pid, p in _leftovers(dst) if not _alive(pid)), key=lambda p: p.name)
    for path in dead:
        if ".old-" in path.name and not os.path.lexists(dst):
            path.rename(dst)
    for path in dead:
        _remove(path)  # a no-op for the one renamed back


def _link_tree(src: Path, dst: Path):
    """Recreate src at dst: directories anew, symlinks as symlinks, files as hard links (a copy where linking fails)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for entry in src.iterdir():
            _link_tree(entry, dst / entry.name)
        shutil.copystat(src, dst)
    else:
        try:
            os.link(src, dst)
        except OSError:  # EXDEV, EPERM, EMLINK, ENOTSUP: no link here; a real problem (ENOSPC, EIO) fails the copy too
            shutil.copy2(src, dst)


def _swap(tmp: Path, dst: Path):
    """Rename tmp to dst; an existing dst is moved aside first and deleted last (put back if the rename fails)."""
    if not os.path.lexists(dst):
        tmp.rename(dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    dst.rename(old)  # a SIGKILL from here to the next rename: recover_interrupted puts old back
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    _remove(old)


@contextmanager
def atomic_dir(dst: Path, *, keep: Callable[[str], bool] | None = None):
    """Yield an empty hidden directory beside dst; on success it replaces dst, on any failure it is deleted.

    keep: which entries of an existing dst (by name) carry over into the new one unless it has its own (e.g. a
    tokenizer, notes, a training run's states beside an exported model). They are hard-linked, recursively, so
    gigabytes cost no copy and no space (copied only where the filesystem refuses a link); the old names stay in
    dst until the swap.
    A SIGKILL at any point loses nothing: the next call first recovers what a killed one left (recover_interrupted).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(dst)  # also removes an earlier temporary of this pid
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        if keep is not None and dst.is_dir():
            for entry in dst.iterdir():
                if keep(entry.name) and not os.path.lexists(tmp / entry.name):
                    _link_tree(entry, tmp / entry.name)
        _swap(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
