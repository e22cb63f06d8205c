"""atomic.atomic_dir: dst is replaced whole or not at all, what a killed writer left is recovered on the next run
(and a live writer's files are never touched), and the user files of a replaced dst carry over by hard link."""

import errno
import os
import subprocess
from pathlib import Path

import pytest

from gptneox.atomic import atomic_dir, recover_interrupted
from gptneox.checkpoint import is_user_file


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tree(folder: Path) -> dict:
    """relative path -> (inode, text) of every regular file under folder (symlinks aside)."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.read_text()) for p in files}


USER_FILES = ("notes.txt", "run.json", "checkpoints/step-100.pt", "checkpoints/best/step-50.pt")


def training_run(dst: Path) -> Path:
    """A training run's output directory: an exported model beside the run's own files."""
    for name in ("config.json", "model.safetensors", *USER_FILES):
        write(dst / name, f"old {name}")
    (dst / "latest.pt").symlink_to("checkpoints/step-100.pt")
    return dst


# ------------------------------------------------------------------------------------------ killed writers
def test_atomic_dir_removes_a_dead_process_temporary(tmp_path):
    write(tmp_path / f".out.tmp-{dead_pid()}" / "part-00000.tmp", "half a shard")
    with atomic_dir(tmp_path / "out") as tmp:
        write(tmp / "model.safetensors", "new")
    assert names(tmp_path) == ["out"] and names(tmp_path / "out") == ["model.safetensors"]


def test_atomic_dir_never_touches_a_live_process_entries(tmp_path, live_pid):
    theirs = write(tmp_path / f".out.tmp-{live_pid}" / "part-00000.tmp", "being written")
    moved = write(tmp_path / f".out.old-{live_pid}" / "model.safetensors", "about to be replaced")
    with atomic_dir(tmp_path / "out") as tmp:
        write(tmp / "model.safetensors", "ours")
    assert theirs.read_text() == "being written" and moved.read_text() == "about to be replaced"
    assert (tmp_path / "out" / "model.safetensors").read_text() == "ours"


def test_atomic_dir_puts_back_a_dst_killed_between_its_renames(tmp_path):
    pid = dead_pid()  # it renamed dst to .out.old-PID, then died before renaming its temporary to dst
    write(tmp_path / f".out.old-{pid}" / "model.safetensors", "previous")
    write(tmp_path / f".out.old-{pid}" / "notes.txt", "mine")
    write(tmp_path / f".out.tmp-{pid}" / "model.safetensors", "unfinished")
    with pytest.raises(RuntimeError, match="body failed"):  # restored before anything else: even if this run fails
        with atomic_dir(tmp_path / "out"):
            raise RuntimeError("body failed")
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "model.safetensors").read_text() == "previous"
    with atomic_dir(tmp_path / "out", keep=is_user_file) as tmp:
        write(tmp / "model.safetensors", "new")
    assert names(tmp_path) == ["out"] and names(tmp_path / "out") == ["model.safetensors", "notes.txt"]


def test_atomic_dir_deletes_a_dead_process_old_copy_beside_dst(tmp_path):
    write(tmp_path / "out" / "model.safetensors", "current")  # the swap happened; deleting the old copy did not
    write(tmp_path / f".out.old-{dead_pid()}" / "model.safetensors", "replaced")
    recover_interrupted(tmp_path / "out")
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "model.safetensors").read_text() == "current"


# --------------------------------------------------------------------------------------------- user files
def test_atomic_dir_carries_user_files_by_hard_link(tmp_path):
    dst = training_run(tmp_path / "out")
    before = tree(dst)
    with atomic_dir(dst, keep=is_user_file) as tmp:
        write(tmp / "model.safetensors", "new")
    after = tree(dst)
    assert after.pop("model.safetensors")[1] == "new" and "config.json" not in after  # checkpoint files: not carried
    assert after == {name: before[name] for name in USER_FILES}  # same inodes: linked, not copied
    assert os.readlink(dst / "latest.pt") == "checkpoints/step-100.pt"  # a symlink stays a symlink
    assert names(tmp_path) == ["out"]


def test_atomic_dir_copies_where_hard_links_fail(tmp_path, monkeypatch):
    def no_link(src, dst, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    dst = training_run(tmp_path / "out")
    before = tree(dst)
    monkeypatch.setattr(os, "link", no_link)
    with atomic_dir(dst, keep=is_user_file) as tmp:
        write(tmp / "model.safetensors", "new")
    after = tree(dst)
    for name in USER_FILES:
        assert after[name][1] == before[name][1] and after[name][0] != before[name][0], name  # copied


def _fail_swap(monkeypatch):
    real = Path.rename

    def rename(self, target):
        if ".tmp-" in self.name:
            raise OSError(errno.EIO, "rename failed")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def _fail_copy(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", fail)
    monkeypatch.setattr("shutil.copy2", fail)


@pytest.mark.parametrize("where", ["body", "carry-over", "swap"])
def test_atomic_dir_failure_leaves_dst_untouched_and_no_temporary(where, tmp_path, monkeypatch):
    dst = training_run(tmp_path / "out")
    before = tree(dst)
    {"body": lambda m: None, "carry-over": _fail_copy, "swap": _fail_swap}[where](monkeypatch)
    with pytest.raises((OSError, RuntimeError)):
        with atomic_dir(dst, keep=is_user_file) as tmp:
            write(tmp / "model.safetensors", "half written")
            if where == "body":
                raise RuntimeError("killed by the body")
    assert tree(dst) == before and os.path.islink(dst / "latest.pt")
    assert names(tmp_path) == ["out"]
