"""Loading Pythia training checkpoints by name and revision from a fake HF hub cache, offline: from_pretrained,
the published steps, bad and missing revisions, and a sweep over revisions that must not grow memory."""

import gc
import hashlib
import weakref
from pathlib import Path

import pytest
import test_hub
import torch
from test_hub import fake_hub_snapshot
from tiny import hf_model, save_checkpoint
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

import gptneox
from gptneox import GPTNeoX, Tokenizer, causal_lm_loss, pythia_steps
from gptneox.hub import CheckpointNotFound

env = test_hub.env  # the fixture: empty cwd and hub cache, no $GPTNEOX_HOME, downloads fail as if offline
REPO = "EleutherAI/pythia-70m"
TEXT = "the quick brown fox jumps over the lazy dog"
def tiny_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json whose ids (< 16) fit the tiny models' vocabulary of 101."""
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(dict.fromkeys(TEXT.split()))}
    tok = HFTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def hub_revision(env, revision, seed=0, form="safetensors", repo=REPO, **overrides) -> Path:
    """A tiny random checkpoint (with tokenizer.json) stored in the fake hub cache as repo's branch `revision`."""
    src = save_checkpoint(hf_model(seed, **overrides), env / "src" / revision, form)
    tiny_tokenizer(src / "tokenizer.json")
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    return fake_hub_snapshot(env / "hf-cache", repo, revision, commit, src=src)


def vm_rss() -> int:
    """This process's resident set in bytes, from /proc/self/status (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


# ------------------------------------------------------------------------------------------------- loading by name
def test_from_pretrained_by_name_and_revision_loads_that_snapshot(env):
    snapshots = {rev: hub_revision(env, rev, seed) for rev, seed in (("step1000", 1), ("step2000", 2))}
    ids = torch.randint(0, 101, (1, 7))
    logits = {}
    for rev, snapshot in snapshots.items():
        logits[rev] = GPTNeoX.from_pretrained(REPO, revision=rev)(ids)
        torch.testing.assert_close(logits[rev], GPTNeoX.from_pretrained(snapshot)(ids), rtol=0, atol=0)
        torch.testing.assert_close(logits[rev], GPTNeoX.from_pretrained(f"{REPO}@{rev}")(ids), rtol=0, atol=0)
        torch.testing.assert_close(logits[rev], GPTNeoX.from_pretrained(str(snapshot))(ids), rtol=0, atol=0)
    assert not torch.allclose(logits["step1000"], logits["step2000"]), "two revisions, two sets of weights"
    same = GPTNeoX.from_pretrained("pythia-70m@step2000", revision="step2000")(ids)  # agreeing twice is fine
    torch.testing.assert_close(same, logits["step2000"], rtol=0, atol=0)


def test_tokenizer_from_pretrained_by_name_and_revision(env):
    snapshot = hub_revision(env, "step512")
    for tok in (Tokenizer.from_pretrained(REPO, revision="step512"), Tokenizer.from_pretrained("pythia-70m@step512")):
        assert tok.source == str(snapshot / "tokenizer.json")
        assert tok.encode("the lazy dog") == [2, 8, 9]
    assert Tokenizer.from_pretrained(str(snapshot / "tokenizer.json")).encode("fox") == [5]  # a file path still works


def test_strings_that_are_paths_are_never_looked_up(env, monkeypatch):
    def never(*args):
        raise AssertionError("a path was looked up as a model name")
    monkeypatch.setattr("gptneox.hub.resolve_checkpoint", never)
    for path in ("tok.json", "data/tok.json", "./tok", str(env / "nowhere" / "tok"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
            Tokenizer.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory not found"):
        GPTNeoX.from_pretrained(str(env / "nowhere"))


def test_revision_with_a_path_or_two_revisions_is_refused(env):
    snapshot = hub_revision(env, "step1000")
    for path in (snapshot, str(snapshot)):
        with pytest.raises(ValueError, match="revision='step1000' applies only to model names"):
            GPTNeoX.from_pretrained(path, revision="step1000")
        with pytest.raises(ValueError, match="applies only to model names"):
            Tokenizer.from_pretrained(path, revision="step1000")
    with pytest.raises(ValueError, match="names revision 'step1000' but revision='step2000' was given"):
        GPTNeoX.from_pretrained(f"{REPO}@step1000", revision="step2000")
    with pytest.raises(ValueError, match="names revision 'step1000' but revision='step2000' was given"):
        Tokenizer.from_pretrained(f"{REPO}@step1000", revision="step2000")


# ------------------------------------------------------------------------------------------------- published steps
def test_pythia_steps_are_the_154_published_branches():
    steps = pythia_steps()
    assert len(steps) == 154 and steps == sorted(set(steps))
    assert steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert steps[-1] == 143000 and all(b - a == 1000 for a, b in zip(steps[11:], steps[12:]))
    assert pythia_steps() is not steps, "a fresh list: a caller may change its own"


def test_unpublished_pythia_step_is_refused_before_any_lookup(env, monkeypatch):
    def never(*args):
        raise AssertionError("looked up or downloaded an unpublished step")
    monkeypatch.setattr("gptneox.hub.download", never)
    monkeypatch.setattr("gptneox.hub.local_candidates", never)
    cases = {"step3001": "the nearest are step3000 and step4000", "step513": "the nearest are step512 and step1000",
             "step3": "the nearest are step2 and step4", "step150000": "the nearest is step143000",
             "step03000": "write it step3000"}
    for revision, nearest in cases.items():
        with pytest.raises(ValueError, match=f"{revision} is not a published Pythia checkpoint; {nearest}"):
            GPTNeoX.from_pretrained("EleutherAI/pythia-410m-deduped", revision=revision)
    with pytest.raises(ValueError, match="step3001 is not a published Pythia checkpoint"):
        Tokenizer.from_pretrained("pythia-160m@step3001")


def test_other_revisions_and_repositories_pass_through(env):
    for name in ("someone/my-neox@step3001", f"{REPO}@my-branch", "databricks/dolly-v2-3b@step3001"):
        with pytest.raises(CheckpointNotFound, match="no network in tests"):  # looked up, then "downloaded"
            GPTNeoX.from_pretrained(name)
    snapshot = hub_revision(env, "step3000")
    commit = snapshot.name
    assert Tokenizer.from_pretrained(REPO, revision=commit).source == str(snapshot / "tokenizer.json")


def test_missing_revision_says_how_to_fetch_it(env):
    hub_revision(env, "step1000")
    for load in (GPTNeoX.from_pretrained, Tokenizer.from_pretrained):
        with pytest.raises(CheckpointNotFound) as e:
            load("pythia-70m", revision="step2000")
        message = str(e.value)
        assert "no local copy of EleutherAI/pythia-70m@step2000" in message and "no network in tests" in message
        assert "pip install huggingface_hub && hf download EleutherAI/pythia-70m --revision step2000" in message


# ------------------------------------------------------------------------------------------------ sweeps and memory
def test_sweep_over_revisions_frees_each_model(env):
    """20 checkpoints of a 6.5 MB model, loaded one at a time as a research sweep does: every earlier model and its
    tensors are freed, and the resident set stays within a few model sizes (a leak would add 130 MB)."""
    shape = dict(hidden_size=256, intermediate_size=1024)  # 1.6M fp32 parameters
    first = hub_revision(env, "step0", 0, "bin", **shape)  # .bin, as Pythia's step branches
    steps = pythia_steps()[::8][:20]
    for step in steps[1:]:  # copies of one file: distinct files, so a leaked model's pages would stay resident
        fake_hub_snapshot(env / "hf-cache", REPO, f"step{step}", hashlib.sha1(str(step).encode()).hexdigest(),
                          src=first)
    ids = torch.randint(0, 101, (2, 16))
    model = GPTNeoX.from_pretrained(REPO, revision="step0")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():  # warm up: the first forward's allocations are not a leak
        model(ids)
    del model
    gc.collect()
    rss, refs = vm_rss(), []
    for step in steps:
        model = GPTNeoX.from_pretrained(REPO, revision=f"step{step}")
        with torch.no_grad():
            causal_lm_loss(model(ids), ids)  # touches every weight
        refs += [weakref.ref(model), weakref.ref(model.gpt_neox.embed_in.weight), weakref.ref(model.embed_out.weight)]
        del model  # freed here, by reference counting, with no wait for the garbage collector
        alive = sum(r() is not None for r in refs)
        if alive:
            gc.collect()
            why = "held in a reference cycle (freed only by gc)" if all(r() is None for r in refs) else "referenced"
            raise AssertionError(f"after step{step}: {alive} earlier model(s) or tensor(s) still {why}")
    gc.collect()
    grown = vm_rss() - rss
    assert grown < 3 * model_bytes, f"RSS grew {grown / 2**20:.1f} MiB over {len(steps)} loads of a " \
                                    f"{model_bytes / 2**20:.1f} MiB model"


def test_gptneox_load_and_lm_evals_model_take_a_revision(env):
    """gptneox.load(name, revision=) loads that revision's weights and tokenizer, as lm-eval's revision model_arg."""
    hub_revision(env, "step1000", seed=1)
    hub_revision(env, "step2000", seed=2)
    a, tok = gptneox.load(REPO, revision="step1000")
    b, _ = gptneox.load(REPO + "@step2000")
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        assert not torch.equal(a(ids), b(ids))
        assert torch.equal(a(ids), GPTNeoX.from_pretrained(REPO, revision="step1000")(ids))
    from gptneox.eval import GPTNeoXLM
    lm = GPTNeoXLM(pretrained=REPO, revision="step2000", device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.allclose(lm.model(ids), b(ids)[..., :lm.vocab_size], atol=1e-5)  # its head cut to the vocab


def test_gptneox_load_says_a_bad_setting_before_looking_for_the_checkpoint(env, tmp_path):
    """A dtype or adapter typo is one line at once, not after a search (or a download) for the weights."""
    for kwargs, message in [(dict(dtype="half"), "dtype='half': not a dtype"),
                            (dict(adapter=tmp_path), "no adapter_config.json there"),
                            (dict(quantize="int4", group_size=48), "group_size 48 is not supported")]:
        with pytest.raises(ValueError, match=message):
            gptneox.load("EleutherAI/no-such-model-here", **kwargs)
