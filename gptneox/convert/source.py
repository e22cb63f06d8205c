"""Reading a checkpoint to convert: which kind it is, and its tensors by name, one at a time from an mmap (HF's
safetensors or .bin layouts, single or sharded) or lazily cast."""

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint import CheckpointError, checkpoint_name, read_tensors, weight_files
from ..config import Config
from ..hub import LAYOUTS
from .neox import expected_shapes

SHARD_FILE = re.compile(r"(model|pytorch_model)-(\d+)-of-(\d+)\.(safetensors|bin)")


def source_kind(path: Path) -> str:
    """'neox' for a directory of DeepSpeed model-states files, 'hf' for one with a config.json."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    names = [p.name for p in path.iterdir()]
    if any(n.endswith("model_states.pt") for n in names):
        return "neox"
    if "config.json" in names:
        return "hf"
    raise CheckpointError(f"{path}: unknown layout: neither an HF checkpoint (config.json + weights) nor a gpt-neox "
                          f"one (*model_states.pt); found: {', '.join(sorted(names)) or 'nothing'}")


# ----------------------------------------------------------------------------------------------- reading HF dirs
def hf_layout(path: Path) -> tuple[list[Path], dict | None, Path | None]:
    """(weight files, index weight_map or None, index file) after refusing mixed or incomplete layouts."""
    names = {p.name for p in path.iterdir() if p.is_file()} if path.is_dir() else set()
    for index_name, single_name in LAYOUTS:
        ext = Path(single_name).suffix
        shards = {n for n in names if SHARD_FILE.fullmatch(n) and n.endswith(ext)}
        if index_name in names and single_name in names:
            raise CheckpointError(f"{path}: mixed layout: both {single_name} and {index_name}; remove the stale one")
        if index_name in names:
            files = weight_files(path)  # checks that every shard the index names exists
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            wrong = [f.name for f in files if f.suffix != ext]
            stray = sorted(shards - {f.name for f in files})
            if wrong or stray:
                raise CheckpointError(f"{path}/{index_name}: mixed layout: " + (
                    f"the index names non-{ext} file(s) {', '.join(wrong)}" if wrong else
                    f"shard file(s) {', '.join(stray)} are not named in the index"))
            return files, weight_map, path / index_name
        if single_name in names:
            if shards:
                raise CheckpointError(f"{path}: mixed layout: {single_name} beside shard file(s) "
                                      f"{', '.join(sorted(shards))}")
            return [path / single_name], None, None
        if shards:
            raise CheckpointError(f"{path}: shard file(s) {', '.join(sorted(shards))} but no {index_name}")
    return weight_files(path), None, None  # raises: nothing recognizable


class _SafetensorsFile:
    def __init__(self, file: Path):
        try:
            self.f = safe_open(file, framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None

    def keys(self):
        return list(self.f.keys())

    def meta(self, key):  # (shape, is floating point)
        s = self.f.get_slice(key)
        return list(s.get_shape()), s.get_dtype() in ("F16", "BF16", "F32", "F64")

    def get(self, key):
        return self.f.get_tensor(key)


class _PickleFile:
    def __init__(self, file: Path):
        self.state = dict(read_tensors(file))  # mmap'd: tensors are views of the file, not copies

    def keys(self):
        return list(self.state)

    def meta(self, key):
        t = self.state[key]
        return list(t.shape), t.is_floating_point()

    def get(self, key):
        return self.state[key]


def _open(file: Path):
    return _SafetensorsFile(file) if file.suffix == ".safetensors" else _PickleFile(file)


class HFCheckpoint:
    """An HF-layout directory, checked against its config.json from metadata alone (no tensor data is read).

    entries: our parameter name -> (file, key in the file), in file order; config: its Config.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.files, self.index, self.index_file = hf_layout(self.path)
        self.config = Config.from_hf_config(self.path)
        self.raw_config = json.loads((self.path / "config.json").read_text())
        self.shapes = {k: list(v) for k, v in expected_shapes(self.config).items()}
        self._handles = {}
        self.entries = self._scan()

    def _handle(self, file):
        if file not in self._handles:
            self._handles[file] = _open(file)
        return self._handles[file]

    def _scan(self) -> dict:
        entries, keys_seen = {}, set()
        for file in self.files:
            handle = _open(file)
            for key in handle.keys():
                keys_seen.add(key)
                if self.index is not None and self.index.get(key) != file.name:
                    raise CheckpointError(f"{file}: holds {key!r}, but {self.index_file.name} maps it to "
                                          f"{self.index.get(key)!r}")
                ours = checkpoint_name(key)
                if ours is None:
                    continue
                shape, is_float = handle.meta(key)
                if ours not in self.shapes:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r}, not part of the model that "
                                          f"{self.path}/config.json describes")
                if ours in entries:
                    raise CheckpointError(f"{file}: tensor {key!r} also appears in {entries[ours][0]}")
                if shape != self.shapes[ours] or not is_float:
                    kind = "" if is_float else " (not floating point)"
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}{kind}, but config.json implies "
                                          f"{self.shapes[ours]}")
                entries[ours] = (file, key)
            del handle  # releases the file's mapping
        if self.index is not None and set(self.index) - keys_seen:
            lost = sorted(set(self.index) - keys_seen)
            raise CheckpointError(f"{self.index_file}: names tensor(s) its shards do not hold: {', '.join(lost[:5])}")
        missing = [k for k in self.shapes if k not in entries]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor(s) {', '.join(missing[:5])}"
                                  f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
        return entries

    def tensors(self):
        """Yield (our name, tensor) file by file; a .bin file's mapping is released once it is done."""
        wanted = {(file, key): ours for ours, (file, key) in self.entries.items()}
        for file in self.files:
            for key, tensor in read_tensors(file):
                if (file, key) in wanted:
                    yield wanted[file, key], tensor

    def get(self, name: str) -> torch.Tensor:
        file, key = self.entries[name]
        return self._handle(file).get(key)

    def close(self):
        self._handles.clear()


class LazyTensors(Mapping):
    """name -> tensor, fetched from the checkpoint (and cast) only when asked for."""

    def __init__(self, ckpt: HFCheckpoint, dtype):
        self.ckpt, self.dtype = ckpt, dtype

    def __getitem__(self, name):
        t = self.ckpt.get(name)
        return t.to(self.dtype) if self.dtype is not None else t

    def __iter__(self):
        return iter(self.ckpt.entries)

    def __len__(self):
        return len(self.ckpt.entries)
