"""docs/research.md runs: its code blocks, in order, on a tiny random model standing in for EleutherAI/pythia-70m
(every published revision present in a fake Hugging Face cache, the network off)."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny import hf_model

from gptneox import pythia_steps

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "research.md"
REPO = "EleutherAI/pythia-70m"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, shared_data):
    """pythia-70m's shape in small (6 layers, 8 heads, the real vocabulary and tokenizer), one snapshot per published
    step (two sets of weights, so a sweep sees them change), refs/main = step143000, as huggingface_hub lays it out."""
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    commits = []
    for seed in (0, 1):
        commit = f"{seed:040d}"
        snapshot = repo / "snapshots" / commit
        hf_model(seed, vocab_size=50304, hidden_size=128, num_hidden_layers=6, num_attention_heads=8,
                 intermediate_size=512, max_position_embeddings=256).save_pretrained(snapshot)
        shutil.copy(Path(shared_data) / "pythia-tokenizer.json", snapshot / "tokenizer.json")
        commits.append(commit)
    (repo / "refs").mkdir()
    for i, step in enumerate(pythia_steps()):
        (repo / "refs" / f"step{step}").write_text(commits[i % 2])
    (repo / "refs" / "main").write_text(commits[(len(pythia_steps()) - 1) % 2])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("GPTNEOX_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gptneox.hub.download", lambda *a: (_ for _ in ()).throw(ConnectionError("offline test")))
    return repo


def test_research_guide_runs_as_written(fake_hub, capsys):
    blocks = code_blocks(GUIDE.read_text())
    assert len(blocks) >= 7, "setup, logit lens, patching, ablation, caching, attribution, checkpoints"
    namespace = {"__name__": "research_guide"}
    grad = torch.is_grad_enabled()
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{GUIDE.name} block {i + 1}", "exec"), namespace)
    finally:
        torch.set_grad_enabled(grad)
    out = capsys.readouterr().out
    assert out.count("after layer") == 6 and out.count("estimated effect") == 6 and "without head 2.3" in out
    assert out.count(" loss ") == 7, "the checkpoint loop loads 7 revisions"
    assert namespace["L"] == 6 and "model" not in namespace, "the loop freed its last checkpoint"
