"""Find a checkpoint directory from what a user types: a path, or a model name with an optional revision.

    resolve_checkpoint("checkpoints/my-run")               an existing directory, as it is
    resolve_checkpoint("dolly-v2-12b")                     databricks/dolly-v2-12b, looked up locally, else fetched
    resolve_checkpoint("EleutherAI/pythia-1.4b-deduped@step3000")   a Pythia training checkpoint (a hub branch)
    resolve_checkpoint("pythia-70m", revision="step3000")           the same, the revision as a keyword

Names are looked up, in order, in ./checkpoints, in $GPTNEOX_HOME (each as ORG/NAME or NAME, with "@REV" appended
for a revision), and in the Hugging Face hub cache (models--ORG--NAME/snapshots/..., what `hf download` and
transformers write), so weights downloaded with HF tools are used where they are. Failing that, the checkpoint is
fetched with huggingface_hub when it is installed and the network answers; otherwise the error says how to fetch it.
A Pythia revision stepN that EleutherAI never published (pythia_steps() lists the 154 that exist) is refused first.
"""

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from .config import HUB_IDS, PRESETS

# (index, single file) pairs
LAYOUTS = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))
HOME_ENV = "GPTNEOX_HOME"
# what a checkpoint needs: config, weights in any published layout, the tokenizer (never optimizer states or .h5)
FETCH_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_NAME = re.compile(r"(?:(?P<org>[\w.-]+)/)?(?P<name>[\w.-]+)(?:@(?P<rev>[\w./-]+))?")
_STEP = re.compile(r"step(\d+)")
# Pythia's published training checkpoints (hub branches, github.com/EleutherAI/pythia README, "Models"): step0, then
# log-spaced step1 ... step512 (powers of two), then every 1000 steps up to step143000, the last (== main)
PYTHIA_LOG_STEPS = [0] + [2 ** i for i in range(10)]
PYTHIA_LAST_STEP, PYTHIA_STEP_EVERY = 143000, 1000
PROBE_S = 5  # seconds a connection to the hub may take before the machine counts as offline


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


def pythia_steps() -> list[int]:
    """The 154 training steps EleutherAI published for every Pythia model (branch "step{N}"), ascending."""
    return PYTHIA_LOG_STEPS + list(range(PYTHIA_STEP_EVERY, PYTHIA_LAST_STEP + 1, PYTHIA_STEP_EVERY))


def check_pythia_revision(repo_id: str, revision: str | None) -> None:
    """Raise ValueError, naming the nearest published steps, for a stepN revision of EleutherAI/pythia-* that does
    not exist (step3001, step150000). Other revisions (main, a branch, a commit hash) and repositories pass."""
    org, name = repo_id.split("/")
    m = _STEP.fullmatch(revision or "")
    if org.lower() != "eleutherai" or not name.lower().startswith("pythia") or m is None:
        return
    steps, step = pythia_steps(), int(m.group(1))
    if revision == f"step{step}" and step in steps:
        return
    if step in steps:  # step03000: the branch is spelled without leading zeros
        which = f"write it step{step}"
    else:
        nearest = [f"step{s}" for s in [s for s in steps if s < step][-1:] + [s for s in steps if s > step][:1]]
        which = f"the nearest {'are ' + ' and '.join(nearest) if len(nearest) == 2 else 'is ' + nearest[0]}"
    raise ValueError(f"{revision} is not a published Pythia checkpoint; {which} ({repo_id} has step0, step1, step2, "
                     f"step4, ..., step512, then every {PYTHIA_STEP_EVERY} steps up to step{PYTHIA_LAST_STEP} == main; "
                     "gptneox.pythia_steps() lists them)")


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


def offline_reason() -> str | None:
    """Why the hub cannot be reached now, or None: HF_HUB_OFFLINE is set, or the endpoint does not answer within
    PROBE_S seconds. A machine without network then fails at once, instead of after huggingface_hub's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy: only huggingface_hub knows whether it answers
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=PROBE_S).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached from this machine ({e.strerror or e})"
    return None


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


def _revision_only_for_names(path: Path, revision: str | None) -> None:
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies only to model names, and {path} is a path: pass the "
                         "directory of that revision, or a name like 'EleutherAI/pythia-70m'")


def _merge_revision(name_or_path: str, named: str | None, revision: str | None) -> str | None:
    if named is not None and revision is not None and named != revision:
        raise ValueError(f"{name_or_path!r} names revision {named!r} but revision={revision!r} was given; give one")
    return named if named is not None else revision


def resolve_checkpoint(name_or_path: str, *, revision: str | None = None, download_missing: bool = True) -> Path:
    """The checkpoint directory for a path or a model name (see the module docstring for the lookup order).

    revision= is the same as "@REV" in the name (both, disagreeing, is a ValueError). Raises ValueError for a name
    that cannot be a model or an unpublished Pythia step, CheckpointNotFound (a FileNotFoundError) when there is no
    local copy and fetching is off, impossible or fails; its message lists where it looked and the fetch command.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _revision_only_for_names(path, revision)
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; a checkpoint is a directory holding config.json and the weights")
    repo_id, named = parse_name(name_or_path)
    revision = _merge_revision(name_or_path, named, revision)
    check_pythia_revision(repo_id, revision)
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
    reason = offline_reason()
    if reason is not None:
        reason = f"the Hugging Face hub cannot be reached ({reason})"
    else:
        try:
            fetched = download(repo_id, revision)
        except ImportError:
            reason = "huggingface_hub is not installed"
        except Exception as e:  # unknown repository or revision, gated, disk full: all say the same to a user
            first_line = (str(e).splitlines() or [""])[0][:200]
            reason = f"fetching from the Hugging Face hub failed ({type(e).__name__}: {first_line})"
        else:
            if is_checkpoint(fetched):
                return fetched
            reason = f"the download at {fetched} holds no config.json with weights"
    raise CheckpointNotFound(f"no local copy of {repo_id}{'@' + revision if revision else ''} and {reason}; "
                             f"looked in:\n  {looked}\n{how}")


def _is_path(name_or_path) -> bool:
    """A Path, an existing file or directory, or a string no hub name looks like ("/x", "./x", "~/x", "a/b/c",
    "tok.json"): a typo in a path gets the loader's "not found", never a hub lookup."""
    s = str(name_or_path)
    return isinstance(name_or_path, os.PathLike) or Path(s).expanduser().exists() or os.path.isabs(s) or \
        s.startswith((".", "~")) or s.endswith(".json") or s.split("@")[0].count("/") > 1


def checkpoint_path(name_or_path, *, revision: str | None = None) -> Path:
    """What from_pretrained reads: a path as it is (the loader says what is wrong with it), or a model name found
    or fetched by resolve_checkpoint."""
    path = Path(name_or_path).expanduser()
    if _is_path(name_or_path):
        _revision_only_for_names(path, revision)
        return path
    return resolve_checkpoint(name_or_path, revision=revision)
