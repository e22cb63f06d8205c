"""Replace a directory whole or not at all, and never anything in it that gptneox did not provably write.

    with atomic_dir(dst, writer="save_pretrained") as tmp:   # write into tmp; on success tmp becomes dst
        ...

Before anything is written, the entries of an existing dst that the new directory would replace (all of them, or
those `replaces` names; the rest carry over into it by hard link) must be what an earlier gptneox writer wrote and
left unchanged (manifest.py), and replacing them at all needs `force`; otherwise FileExistsError names them and
nothing is touched. An absent dst or an empty directory needs no force. Each write leaves a manifest of what it
produced (carried-over files stay unlisted: they are not ours).

The swap is two renames (dst aside as .NAME.old-PID, then .NAME.tmp-PID to dst). Whatever a process killed at any
point leaves beside dst is recovered by the next atomic_dir on the same dst (recover_interrupted): a killed writer's
temporary is deleted, and a dst caught between the two renames is put back. A live writer's entries are never
touched. Used by save_pretrained, save_adapter, convert_weights.py and train.py's export.
"""

import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from . import manifest


def umask() -> int:
    """This process's umask: the Umask line of /proc/self/status (Linux 4.7+), else set and restored (in that moment
    another thread's new file would get mode 0644)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(file) -> None:
    """Give a file that a library created with fixed permissions (safetensors' save_file: 0600) the mode any new file
    gets, 0666 less the umask."""
    os.chmod(file, 0o666 & ~umask())


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


def _shown(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _replaced(dst: Path, replaces: Callable[[str], bool] | None) -> list[Path]:
    """The entries of dst that a new directory replaces (all, or those `replaces` names); the manifest goes anyway."""
    if not dst.is_dir():
        return []
    return [e for e in sorted(dst.iterdir()) if e.name != manifest.MANIFEST and (replaces is None or replaces(e.name))]


def _refuse(dst: Path, entries: list[Path], force: bool, flag: str, owner: str | None) -> None:
    """Raise FileExistsError unless replacing entries is allowed: none, or all provably owner's output and force."""
    if not entries:
        return
    foreign = manifest.unproven(dst, entries, writer=owner)
    if foreign:
        them = "it" if len(foreign) == 1 else "them"
        raise FileExistsError(f"{dst} holds {_shown(foreign)}, not written by {owner or 'gptneox'} (or changed "
                              f"since): move {them} away or choose another destination")
    if not force:
        names = [p.name + ("/" if p.is_dir() else "") for p in entries]
        raise FileExistsError(f"{dst} already holds the output of {manifest.writer_of(dst)} ({_shown(names)}); pass "
                              f"{flag} to replace it")


def check_replace(dst, *, replaces: Callable[[str], bool] | None = None, force=False, flag="force=True",
                  owner: str | None = None) -> None:
    """The rule atomic_dir applies before writing, for a caller that wants it checked earlier (before reading a source).

    replaces: which entries of an existing dst (by name) a new directory replaces; None: all. force: whether it may
    replace any. flag: how the caller spells force, for the message ("--force" on a command line). owner: only the
    output of a writer whose name starts with it may be replaced (e.g. "convert_weights.py"); None: any gptneox writer.
    """
    dst = Path(dst)
    if os.path.lexists(dst) and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory: move it away or choose another destination")
    _refuse(dst, _replaced(dst, replaces), force, flag, owner)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p folder; returns the directories it created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


@contextmanager
def atomic_dir(dst: Path, *, writer: str, replaces: Callable[[str], bool] | None = None, force=False,
               flag="force=True", owner: str | None = None):
    """Yield an empty hidden directory beside dst; on success it replaces dst, on any failure it is deleted (and so are
    the parents of dst it created).

    writer: who writes, recorded in the manifest (e.g. "save_pretrained"). replaces, force, flag, owner: which entries
    of an existing dst may be replaced, checked before anything is written and again before the swap
    (check_replace). The entries it does not replace (e.g. a tokenizer, notes, a training run's states beside an
    exported model) carry over, hard-linked, recursively, so gigabytes cost no copy and no space (copied only where
    the filesystem refuses a link); the old names stay in dst until the swap.
    A SIGKILL at any point loses nothing: the next call first recovers what a killed one left (recover_interrupted).
    """
    dst = Path(dst)
    recover_interrupted(dst)  # also removes an earlier temporary of this pid
    check_replace(dst, replaces=replaces, force=force, flag=flag, owner=owner)
    created = _make_parents(dst.parent)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        yield tmp
        manifest.write(tmp, writer)
        replaced = _replaced(dst, replaces)
        kept = [e for e in _replaced(dst, None) if e not in replaced]
        # again, now: a long write gave time for changes; and the writer may have written a name it did not declare
        check_replace(dst, replaces=replaces, force=force, flag=flag, owner=owner)
        _refuse(dst, [e for e in kept if os.path.lexists(tmp / e.name)], force, flag, owner)
        for entry in kept:
            _link_tree(entry, tmp / entry.name)
        _swap(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # no longer empty: something else writes there too
                break
        raise
