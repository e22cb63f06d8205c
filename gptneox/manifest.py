"""What gptneox provably wrote in a directory: the manifest every directory writer leaves in what it writes.

    .gptneox-manifest.json   {"writer": "save_pretrained", "dirs": ["configs"],
                              "files": {"config.json": {"size": 812, "mtime_ns": ..., "sha256": "..."}, ...}}

A file is provably ours when the manifest lists it and its size, modification time and (for a small file) content
still match: a file edited, replaced or added since is not. A directory is ours when the manifest lists it and all it
holds is ours. Paths are relative, with "/" between parts. atomic.atomic_dir writes the manifest and checks it
before it replaces anything.
"""

import hashlib
import json
import os
import stat
from pathlib import Path

MANIFEST = ".gptneox-manifest.json"
# files up to this size are hashed as well: configs, indexes and tokenizers, the files a user edits by hand, whose
# edit could otherwise keep the size and fall within one tick of the filesystem's clock; weights are never re-read
HASHED_MAX = 16 * 2**20


def _record(file: Path) -> dict:
    st = os.lstat(file)
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= HASHED_MAX:
        record["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    return record


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _walk(folder: Path, top: bool = True):
    """(relative path, path) of every entry under folder, depth first; the manifest of the top folder aside."""
    for entry in sorted(folder.iterdir()):
        if top and entry.name == MANIFEST:
            continue
        yield entry.name, entry
        if _is_dir(entry):
            yield from ((f"{entry.name}/{rel}", p) for rel, p in _walk(entry, top=False))


def write(folder, writer: str) -> None:
    """List every file and directory under folder as written by `writer` (e.g. "save_pretrained")."""
    folder = Path(folder)
    entries = list(_walk(folder))
    assert not any(p.is_symlink() for _, p in entries), f"{folder}: writers write files, never symlinks"
    manifest = {"writer": writer, "dirs": [rel for rel, p in entries if _is_dir(p)],
                "files": {rel: _record(p) for rel, p in entries if not _is_dir(p)}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read(folder) -> dict | None:
    """folder's manifest, or None if it has none or one that is not ours."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    shape = {"writer": str, "dirs": list, "files": dict}
    ok = isinstance(manifest, dict) and all(isinstance(manifest.get(k), t) for k, t in shape.items())
    return manifest if ok else None


def _matches(path: Path, record) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or not isinstance(record, dict):
        return False
    if (st.st_size, st.st_mtime_ns) != (record.get("size"), record.get("mtime_ns")):
        return False
    return "sha256" not in record or hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]


def _listed(manifest: dict, rel: str, path: Path) -> bool:
    if _is_dir(path):
        return rel in manifest["dirs"]
    return rel in manifest["files"] and _matches(path, manifest["files"][rel])


def _ours(manifest: dict, rel: str, path: Path) -> bool:
    inside = _walk(path, top=False) if _is_dir(path) else ()
    return _listed(manifest, rel, path) and all(_listed(manifest, f"{rel}/{r}", p) for r, p in inside)


def unproven(folder, entries, *, writer: str | None = None) -> list[str]:
    """The names of the entries of folder (Paths directly in it) that it does not prove ours, "name/" for a directory.
    writer: only what a writer whose name starts with it wrote counts (e.g. "convert_weights.py"); None: any."""
    manifest = read(folder)
    if manifest is not None and writer is not None and not manifest["writer"].startswith(writer):
        manifest = None
    return [p.name + ("/" if _is_dir(p) else "") for p in entries
            if manifest is None or not _ours(manifest, p.name, p)]


def writer_of(folder) -> str | None:
    """The writer its manifest names, if folder has one."""
    manifest = read(folder)
    return manifest["writer"] if manifest else None
