"""atomic.atomic_dir: dst is replaced whole or not at all, what a killed writer left is recovered on the next run
(and a live writer's files are never touched), the user files of a replaced dst carry over by hard link, and nothing
is replaced that an earlier write did not provably produce (its manifest), nor anything at all without force."""

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from gptneox import atomic
from gptneox.atomic import atomic_dir, recover_interrupted
from gptneox.manifest import MANIFEST

MODEL = {"config.json", "model.safetensors"}.__contains__  # what the writers of these tests replace
NOTHING = lambda name: False  # noqa: E731 (a writer that only adds)


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
    """relative path -> (inode, text) of every regular file under folder (symlinks aside), the manifest aside."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST]
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.read_text()) for p in files}


def contents(folder: Path) -> dict:
    """relative path -> (bytes, mode, mtime) of every entry under folder (a symlink: its target), manifest included."""
    def entry(p):
        st = p.lstat()
        return (os.readlink(p) if p.is_symlink() else None if p.is_dir() else p.read_bytes(), st.st_mode,
                st.st_mtime_ns)
    return {str(p.relative_to(folder)): entry(p) for p in sorted(folder.rglob("*"))}


USER_FILES = ("notes.txt", "run.json", "checkpoints/step-100.pt", "checkpoints/best/step-50.pt")


def training_run(dst: Path) -> Path:
    """A training run's output directory: an exported model (written by atomic_dir) beside the run's own files."""
    with atomic_dir(dst, writer="export") as tmp:
        for name in ("config.json", "model.safetensors"):
            write(tmp / name, f"old {name}")
    for name in USER_FILES:
        write(dst / name, f"old {name}")
    (dst / "latest.pt").symlink_to("checkpoints/step-100.pt")
    return dst


# ------------------------------------------------------------------------------------------ killed writers
def test_atomic_dir_removes_a_dead_process_temporary(tmp_path):
    write(tmp_path / f".out.tmp-{dead_pid()}" / "part-00000.tmp", "half a shard")
    with atomic_dir(tmp_path / "out", writer="test") as tmp:
        write(tmp / "model.safetensors", "new")
    assert names(tmp_path) == ["out"] and names(tmp_path / "out") == [MANIFEST, "model.safetensors"]


def test_atomic_dir_never_touches_a_live_process_entries(tmp_path, live_pid):
    theirs = write(tmp_path / f".out.tmp-{live_pid}" / "part-00000.tmp", "being written")
    moved = write(tmp_path / f".out.old-{live_pid}" / "model.safetensors", "about to be replaced")
    with atomic_dir(tmp_path / "out", writer="test") as tmp:
        write(tmp / "model.safetensors", "ours")
    assert theirs.read_text() == "being written" and moved.read_text() == "about to be replaced"
    assert (tmp_path / "out" / "model.safetensors").read_text() == "ours"


def test_atomic_dir_puts_back_a_dst_killed_between_its_renames(tmp_path):
    pid = dead_pid()  # it renamed dst to .out.old-PID, then died before renaming its temporary to dst
    write(tmp_path / f".out.old-{pid}" / "model.safetensors", "previous")
    write(tmp_path / f".out.old-{pid}" / "notes.txt", "mine")
    write(tmp_path / f".out.tmp-{pid}" / "model.safetensors", "unfinished")
    with pytest.raises(RuntimeError, match="body failed"):  # restored before anything else: even if this run fails
        with atomic_dir(tmp_path / "out", writer="test", replaces=NOTHING):
            raise RuntimeError("body failed")
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "model.safetensors").read_text() == "previous"
    with pytest.raises(FileExistsError, match="holds model.safetensors, not written by gptneox"):
        with atomic_dir(tmp_path / "out", writer="test", replaces=MODEL, force=True):
            pass  # the restored dst's model has no manifest: nothing proves it ours
    with atomic_dir(tmp_path / "out", writer="test", replaces=NOTHING) as tmp:
        write(tmp / "model.bin", "new")
    assert names(tmp_path) == ["out"]
    assert names(tmp_path / "out") == [MANIFEST, "model.bin", "model.safetensors", "notes.txt"]


def test_atomic_dir_deletes_a_dead_process_old_copy_beside_dst(tmp_path):
    write(tmp_path / "out" / "model.safetensors", "current")  # the swap happened; deleting the old copy did not
    write(tmp_path / f".out.old-{dead_pid()}" / "model.safetensors", "replaced")
    recover_interrupted(tmp_path / "out")
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "model.safetensors").read_text() == "current"


# --------------------------------------------------------------------------------------------- user files
def test_atomic_dir_carries_user_files_by_hard_link(tmp_path):
    dst = training_run(tmp_path / "out")
    before = tree(dst)
    with atomic_dir(dst, writer="test", replaces=MODEL, force=True) as tmp:
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
    with atomic_dir(dst, writer="test", replaces=MODEL, force=True) as tmp:
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
    before = contents(dst)
    {"body": lambda m: None, "carry-over": _fail_copy, "swap": _fail_swap}[where](monkeypatch)
    with pytest.raises((OSError, RuntimeError)):
        with atomic_dir(dst, writer="test", replaces=MODEL, force=True) as tmp:
            write(tmp / "model.safetensors", "half written")
            if where == "body":
                raise RuntimeError("killed by the body")
    assert contents(dst) == before and os.path.islink(dst / "latest.pt")
    assert names(tmp_path) == ["out"]


# ------------------------------------------------------------------------------------ what may be replaced
def test_atomic_dir_lists_what_it_wrote_and_not_what_carried_over(tmp_path):
    dst = training_run(tmp_path / "out")
    with atomic_dir(dst, writer="save_pretrained", replaces=MODEL, force=True) as tmp:
        write(tmp / "model.safetensors", "new")
        write(tmp / "configs" / "model.yml", "a: 1")
    listed = json.loads((dst / MANIFEST).read_text())
    assert listed["writer"] == "save_pretrained" and listed["dirs"] == ["configs"]
    assert sorted(listed["files"]) == ["configs/model.yml", "model.safetensors"]  # run.json, notes.txt: the user's
    st = (dst / "model.safetensors").stat()
    assert listed["files"]["model.safetensors"]["size"] == 3 and listed["files"]["model.safetensors"]["mtime_ns"] == \
        st.st_mtime_ns


@pytest.mark.parametrize("existing", ["absent", "empty", "only a manifest"])
def test_atomic_dir_needs_no_force_where_nothing_is_replaced(existing, tmp_path):
    dst = tmp_path / "out"
    if existing != "absent":
        dst.mkdir()
    if existing == "only a manifest":
        write(dst / MANIFEST, "{}")
    with atomic_dir(dst, writer="test") as tmp:
        write(tmp / "model.safetensors", "new")
    assert names(dst) == [MANIFEST, "model.safetensors"]


def test_atomic_dir_replaces_an_earlier_output_only_with_force(tmp_path):
    dst = training_run(tmp_path / "out")
    before = contents(dst)
    with pytest.raises(FileExistsError) as e:
        with atomic_dir(dst, writer="test", replaces=MODEL, flag="--force"):
            raise AssertionError("the body must not run")
    assert str(e.value) == (f"{dst} already holds the output of export (config.json, model.safetensors); "
                            "pass --force to replace it")
    assert contents(dst) == before and names(tmp_path) == ["out"]
    with atomic_dir(dst, writer="test", replaces=MODEL, force=True) as tmp:
        write(tmp / "model.safetensors", "new")
    assert (dst / "model.safetensors").read_text() == "new" and not (dst / "config.json").exists()


def _edit_same_size_and_time(file: Path):
    st = file.stat()
    file.write_text(file.read_text().upper())
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # what a fast edit within one clock tick looks like


USER_EDITS = {  # what a user did to an earlier output -> the entry the refusal names
    "a file of theirs": (lambda d: write(d / "config.json", "{}"), "config.json"),
    "a file edited": (lambda d: write(d / "model.safetensors", "edited by hand"), "model.safetensors"),
    "a file edited keeping size and time": (lambda d: _edit_same_size_and_time(d / "config.json"), "config.json"),
    "a file replaced by a symlink": (lambda d: (d / "config.json").unlink() or (d / "config.json").symlink_to(
        "run.json"), "config.json"),
    "a file added to a written folder": (lambda d: write(d / "configs" / "mine.yml", "{}"), "configs/"),
    "a manifest not ours": (lambda d: write(d / MANIFEST, "[]"), "config.json, configs/, model.safetensors, run.json"),
}


@pytest.mark.parametrize("edit", USER_EDITS)
def test_atomic_dir_with_force_refuses_what_it_cannot_prove_ours_and_touches_nothing(edit, tmp_path):
    dst = tmp_path / "out"
    with atomic_dir(dst, writer="convert_weights.py --to hf") as tmp:
        for name in ("config.json", "model.safetensors", "configs/model.yml", "run.json"):
            write(tmp / name, f"written {name}")
    do, named = USER_EDITS[edit]
    do(dst)
    before = contents(dst)
    with pytest.raises(FileExistsError) as e:
        with atomic_dir(dst, writer="test", force=True, flag="--force"):
            raise AssertionError("the body must not run")
    message = str(e.value)
    assert message.startswith(f"{dst} holds {named}, not written by gptneox (or changed since): move ")
    assert "\n" not in message and "force=True" not in message
    assert contents(dst) == before and names(tmp_path) == ["out"]


def test_atomic_dir_owner_limits_force_to_one_writer(tmp_path):
    dst = tmp_path / "out"
    with atomic_dir(dst, writer="save_pretrained") as tmp:
        write(tmp / "config.json", "{}")
    with pytest.raises(FileExistsError, match="holds config.json, not written by convert_weights.py"):
        atomic.check_replace(dst, force=True, owner="convert_weights.py")
    atomic.check_replace(dst, force=True)  # any gptneox writer


def test_atomic_dir_names_at_most_ten_entries(tmp_path):
    dst = tmp_path / "out"
    for i in range(13):
        write(dst / f"notes-{i:02d}.txt", "mine")
    with pytest.raises(FileExistsError, match=r"holds notes-00.txt, .*, notes-09.txt and 3 more, not written by"):
        atomic.check_replace(dst, force=True)
    write(tmp_path / "file", "mine")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        atomic.check_replace(tmp_path / "file", force=True)


def test_atomic_dir_refuses_a_name_the_writer_did_not_declare(tmp_path):
    dst = training_run(tmp_path / "out")
    before = contents(dst)
    with pytest.raises(FileExistsError, match="holds notes.txt, not written by gptneox"):
        with atomic_dir(dst, writer="test", replaces=MODEL, force=True) as tmp:
            write(tmp / "notes.txt", "would overwrite the user's")
    assert contents(dst) == before and names(tmp_path) == ["out"]


def test_atomic_dir_failure_removes_the_parents_it_created(tmp_path):
    with pytest.raises(RuntimeError, match="body failed"):
        with atomic_dir(tmp_path / "a" / "b" / "out", writer="test"):
            raise RuntimeError("body failed")
    assert names(tmp_path) == []


# ---------------------------------------------------------------------------------------------- file modes
@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("proc", [True, False])
def test_follow_umask_gives_a_0600_file_the_mode_of_any_new_file(proc, umask, tmp_path, monkeypatch):
    if not proc:  # no /proc (macOS, some sandboxes): the umask is read by setting it
        real = Path.read_text
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOENT, ""))
                            if str(self) == "/proc/self/status" else real(self, *a, **k))
    assert atomic.umask() == umask
    file = write(tmp_path / "model.safetensors", "weights")
    file.chmod(0o600)
    atomic.follow_umask(file)
    assert file.stat().st_mode & 0o777 == 0o666 & ~umask == write(tmp_path / "other", "").stat().st_mode & 0o777
    assert os.umask(umask) == umask  # left as it was
