"""gptneox.hub.resolve_checkpoint: paths, names, revisions, ./checkpoints, $GPTNEOX_HOME and a fake HF hub cache."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import hf_model, save_checkpoint

from gptneox import GPTNeoX
from gptneox.hub import CheckpointNotFound, offline_reason, parse_name, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty working directory and an empty hub cache; no $GPTNEOX_HOME; downloads fail as if offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("GPTNEOX_HOME", raising=False)

    def offline(repo_id, revision):
        raise ConnectionError("no network in tests")
    monkeypatch.setattr("gptneox.hub.download", offline)
    monkeypatch.setattr("gptneox.hub.offline_reason", lambda: None)  # the hub "answers": download() decides
    return tmp_path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "no network"])
def test_resolve_checkpoint_offline_fails_fast_without_trying_to_download(tmp_path, monkeypatch, why):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("GPTNEOX_HOME", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr("gptneox.hub.download", lambda *a: pytest.fail("download() must not be tried offline"))
    if why == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointNotFound) as e:
        resolve_checkpoint("pythia-14m")
    assert time.perf_counter() - t0 < 5
    message = str(e.value)
    assert "the Hugging Face hub cannot be reached" in message
    assert ("HF_HUB_OFFLINE is set" if why == "HF_HUB_OFFLINE" else "127.0.0.1 cannot be reached") in message
    assert "hf download EleutherAI/pythia-14m" in message


def test_offline_reason_leaves_a_proxy_to_huggingface_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert offline_reason() is None


def test_sample_offline_names_the_fetch_command_at_once(tmp_path):
    """`python sample.py --ckpt pythia-14m` on a machine without network: one line and the fetch command, in seconds
    (huggingface_hub's own retries took ~25 s before)."""
    env = {**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "",
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "PYTHONPATH": str(ROOT)}
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "GPTNEOX_HOME", "HF_HUB_CACHE"):
        env.pop(proxy, None)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", "pythia-14m", "--prompt", "Hi"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 2, done.stderr
    assert "the Hugging Face hub cannot be reached" in done.stderr and "hf download EleutherAI/pythia-14m" in done.stderr
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr
    assert elapsed < 60  # imports on a busy machine; the probe itself is immediate


def fake_checkpoint(path, weights="pytorch_model.bin"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / weights).write_bytes(b"weights")
    return path


def fake_hub_snapshot(cache, repo_id, revision="main", commit="a" * 40, weights="pytorch_model.bin", src=None):
    """The layout huggingface_hub writes: blobs, snapshots/COMMIT/* as symlinks to blobs, refs/REVISION. The files
    are those of directory src (a real checkpoint), else a placeholder config.json and weights file."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    files = [(f.name, f.read_bytes()) for f in sorted(Path(src).iterdir())] if src else \
        [("config.json", b"{}"), (weights, b"weights")]
    for name, data in files:
        blob = repo / "blobs" / f"{commit[:8]}-{name}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def test_parse_name_accepts_presets_hub_ids_and_revisions():
    assert parse_name("dolly-v2-12b") == ("databricks/dolly-v2-12b", None)
    assert parse_name("pythia-1.4b") == ("EleutherAI/pythia-1.4b", None)
    assert parse_name("EleutherAI/pythia-1.4b-deduped@step3000") == ("EleutherAI/pythia-1.4b-deduped", "step3000")
    assert parse_name("someone/my-neox-finetune") == ("someone/my-neox-finetune", None)
    with pytest.raises(ValueError, match="known model name.*pythia-14m"):
        parse_name("dolly-v3-99b")


def test_resolve_checkpoint_returns_an_existing_directory(env):
    ckpt = fake_checkpoint(env / "my-run")
    assert resolve_checkpoint(str(ckpt)) == ckpt
    with pytest.raises(ValueError, match="is a file"):
        resolve_checkpoint(str(ckpt / "config.json"))


def test_resolve_checkpoint_finds_the_hub_cache_snapshot(env):
    snapshot = fake_hub_snapshot(env / "hf-cache", "databricks/dolly-v2-12b")
    for name in ("dolly-v2-12b", "databricks/dolly-v2-12b"):
        assert resolve_checkpoint(name) == snapshot


def test_resolve_checkpoint_follows_revision_refs(env):
    main = fake_hub_snapshot(env / "hf-cache", "EleutherAI/pythia-160m", "main", "b" * 40, "model.safetensors")
    step = fake_hub_snapshot(env / "hf-cache", "EleutherAI/pythia-160m", "step3000", "c" * 40)
    assert resolve_checkpoint("pythia-160m") == main
    assert resolve_checkpoint("pythia-160m@step3000") == step
    assert resolve_checkpoint("pythia-160m", revision="step3000") == step
    assert resolve_checkpoint("EleutherAI/pythia-160m@" + "c" * 40) == step
    with pytest.raises(CheckpointNotFound, match="hf download EleutherAI/pythia-160m --revision step1000"):
        resolve_checkpoint("pythia-160m@step1000", download_missing=False)


def test_resolve_checkpoint_prefers_local_dirs_in_order(env, monkeypatch):
    fake_hub_snapshot(env / "hf-cache", "EleutherAI/pythia-70m")
    home = fake_checkpoint(env / "home" / "pythia-70m")
    monkeypatch.setenv("GPTNEOX_HOME", str(env / "home"))
    assert resolve_checkpoint("pythia-70m") == home
    local = fake_checkpoint(env / "checkpoints" / "EleutherAI" / "pythia-70m", "model.safetensors")
    assert resolve_checkpoint("EleutherAI/pythia-70m").resolve() == local.resolve()
    revision = fake_checkpoint(env / "checkpoints" / "pythia-70m@step512")
    assert resolve_checkpoint("pythia-70m@step512").resolve() == revision.resolve()


def test_resolve_checkpoint_skips_incomplete_copies(env):
    (env / "checkpoints" / "pythia-410m").mkdir(parents=True)  # an interrupted download: no weights
    (env / "checkpoints" / "pythia-410m" / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFound) as e:
        resolve_checkpoint("pythia-410m")
    message = str(e.value)
    assert "no network in tests" in message, "the download failure is reported"
    assert "checkpoints/EleutherAI/pythia-410m" in message and "models--EleutherAI--pythia-410m" in message
    assert "pip install huggingface_hub && hf download EleutherAI/pythia-410m" in message


def test_resolve_checkpoint_uses_the_download(env, monkeypatch):
    fetched = fake_checkpoint(env / "downloaded")
    monkeypatch.setattr("gptneox.hub.download", lambda repo_id, revision: fetched)
    assert resolve_checkpoint("dolly-v2-3b") == fetched


def test_checkpoint_in_fake_hub_cache_loads_through_symlinks(env):
    """A real (tiny) .bin checkpoint laid out as huggingface_hub stores it loads with mmap through the symlinks."""
    hf = hf_model(0)
    fake_hub_snapshot(env / "hf-cache", "databricks/dolly-v2-3b", src=save_checkpoint(hf, env / "src", "bin"))
    model = GPTNeoX.from_pretrained(resolve_checkpoint("dolly-v2-3b"))
    ids = torch.randint(0, 101, (1, 5))
    torch.testing.assert_close(model(ids), hf(ids).logits)
