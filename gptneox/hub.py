"""Find a checkpoint directory from what a user types: a path, or a model name with an optional revision.

    resolve_checkpoint("checkpoints/my-run")               an existing directory, as it is
    resolve_checkpoint("dolly-v2-12b")                     databricks/dolly-v2-12b, looked up locally, else fetched
    resolve_checkpoint("EleutherAI/pythia-1.4b-deduped@step3000")   a Pythia training checkpoint (a hub branch)

Names are looked up, in order, in ./checkpoints, in $GPTNEOX_HOME (each as ORG/NAME or NAME, with "@REV" appended
for a revision), and in the Hugging Face hub cache (models--ORG--NAME/snapshots/..., what `hf download` and
transformers write), so weights downloaded with HF tools are used where they are. Failing that, the checkpoint is
fetched with huggingface_hub when it is installed and the network answers; otherwise the error says how to fetch it.
"""

import os
import re
from pathlib import Path

from .checkpoint import LAYOUTS
from .config import HUB_IDS, PRESETS

HOME_ENV = "GPTNEOX_HOME"
# what a checkpoint needs: config, weights in any published layout, the tokenizer (never optimizer states or .h5)
FETCH_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_NAME = re.compile(r"(?:(?P<org>[\w.-]+)/)?(?P<name>[\w.-]+)(?:@(?P<rev>[\w./-]+))?")


class CheckpointNotFound(FileNotFoundError):
    """No local copy of a named checkpoint, and it could not be fetched; the message says how to fetch it."""


def parse_name(name_or_path: str) -> tuple[str, str | None]:
    """("ORG/NAME", revision or None) for "NAME", "ORG/NAME", with an optional "@REV" ("@step3000").

    A bare NAME must be a preset (pythia-*, dolly-v2-*): its organisation is known. Anything else raises ValueError.
    """
    m = _NAME.fullmatch(name_or_path.strip())
    if m is None:
        raise ValueError(f"{name_or_path!r} is neither an existing directory nor a model name like "
                         "'dolly-v2-12b', 'EleutherAI/pythia-1.4b' or 'pythia-160m@step3000'")
    org, name, rev = m.group("org"), m.group("name"), m.group("rev")
    if org is None:
        if name not in PRESETS:
            raise ValueError(f"{name_or_path!r} is not an existing directory, nor a known model name; known names: "
                             f"{', '.join(PRESETS)} (or give ORG/NAME of a GPT-NeoX repository on the hub)")
        org = next(hub_id.split("/")[0] for hub_id, preset in HUB_IDS.items() if preset == name)
    return f"{org}/{name}", rev


def is_checkpoint(path: Path) -> bool:
    """A directory with a config.json and the weights of one of the published layouts."""
    return (path / "config.json").is_file() and any((path / f).is_file() for pair in LAYOUTS for f in pair)


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def local_candidates(repo_id: str, revision: str | None) -> list[Path]:
    """Every directory where a local copy of repo_id at revision may be, in lookup order."""
    org, name = repo_id.split("/")
    suffix = f"@{revision}" if revision else ""
    roots = [Path("checkpoints")] + ([Path(os.environ[HOME_ENV]).expanduser()] if os.environ.get(HOME_ENV) else [])
    found = [root / sub for root in roots for sub in (f"{org}/{name}{suffix}", f"{name}{suffix}")]
    return found + _hub_snapshots(repo_id, revision)


def _hub_snapshots(repo_id: str, revision: str | None) -> list[Path]:
    """The hub cache's snapshot for revision (refs/REV names a commit; a commit hash names itself)."""
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():
        return [repo / "snapshots" / ref.read_text().strip()]
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return [repo / "snapshots" / revision]
    if revision is None and (repo / "snapshots").is_dir():  # no refs (a copied cache): any complete snapshot
        return sorted((repo / "snapshots").iterdir())
    return []


def fetch_command(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{rev}"


def download(repo_id: str, revision: str | None) -> Path:
    """Fetch config, tokenizer and weights into the hub cache (safetensors when the repository has them, else the
    .bin files), with huggingface_hub's progress bars. Raises ImportError or the hub's network errors."""
    from huggingface_hub import HfApi, snapshot_download
    files = HfApi().list_repo_files(repo_id, revision=revision)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    patterns = FETCH_PATTERNS if has_safetensors else FETCH_PATTERNS + BIN_PATTERNS
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def resolve_checkpoint(name_or_path: str, *, download_missing: bool = True) -> Path:
    """The checkpoint directory for a path or a model name (see the module docstring for the lookup order).

    Raises ValueError for a name that cannot be a model, CheckpointNotFound (a FileNotFoundError) when there is no
    local copy and fetching is off, impossible or fails; its message lists where it looked and the fetch command.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; a checkpoint is a directory holding config.json and the weights")
    repo_id, revision = parse_name(name_or_path)
    candidates = local_candidates(repo_id, revision)
    for candidate in candidates:
        if is_checkpoint(candidate):
            return candidate
    looked = "\n  ".join(str(c) for c in candidates if "snapshots" not in c.parts) + \
        f"\n  {hub_cache_dir() / ('models--' + repo_id.replace('/', '--'))}"
    how = (f"Fetch it with:\n  pip install huggingface_hub && {fetch_command(repo_id, revision)}\n"
           f"or place a checkpoint directory (config.json, weights, tokenizer.json) in ./checkpoints/{repo_id}"
           f"{'@' + revision if revision else ''} or pass its path.")
    if not download_missing:
        raise CheckpointNotFound(f"no local copy of {repo_id}{'@' + revision if revision else ''}; looked in:\n  "
                                 f"{looked}\n{how}")
    try:
        fetched = download(repo_id, revision)
    except ImportError:
        reason = "huggingface_hub is not installed"
    except Exception as e:  # offline, unknown repository or revision, gated, disk full: all say the same to a user
        first_line = (str(e).splitlines() or [""])[0][:200]
        reason = f"fetching from the Hugging Face hub failed ({type(e).__name__}: {first_line})"
    else:
        if is_checkpoint(fetched):
            return fetched
        reason = f"the download at {fetched} holds no config.json with weights"
    raise CheckpointNotFound(f"no local copy of {repo_id}{'@' + revision if revision else ''} and {reason}; "
                             f"looked in:\n  {looked}\n{how}")
