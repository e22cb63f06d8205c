"""AdapterBank (gptneox/lora/bank.py): many LoRA tunes of one base in one batch. The reference for each tune is PEFT's
merge_and_unload() of that adapter on the HF model alone (over a quantized base: our model with that one adapter
attached by load_adapter); a mixed, left-padded batch must give every row what its tune alone gives."""

import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import hf_model, hf_state_dict
from tolerances import FP32_LOGITS_REL, assert_rel_close

from gptneox import Config, GPTNeoX, generate, quantize, stream
from gptneox.generation.batching import Engine, Request
from gptneox.generation.config import GenerationConfig
from gptneox.generation.generator import Generator
from gptneox.generation.run import left_pad, stop_ids
from gptneox.generation.streaming import completion_text
from gptneox.lora import AdapterBank, AdapterError, BankLinear, LoRAConfig, add_lora, load_adapter, save_adapter

warnings.filterwarnings("ignore", module="peft")
peft = pytest.importorskip("peft")

SEED = 1
PROMPTS = [[5, 17, 3, 88, 41], [9, 2, 71, 33, 60, 12, 7, 99, 4], [66, 8, 21], [14, 50, 3, 77, 1, 30, 45],
           [23, 23, 90, 11, 6, 58]]
ROWS = ["qv", None, "all", "mlp", "qv"]  # K = 3 tunes and a base row


def ours(**overrides) -> GPTNeoX:
    hf = hf_model(SEED, **overrides)
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict()))
    model.load_state_dict(hf_state_dict(hf))
    return model.eval()


def randomize_b(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{name: directory}: q / v only in our format (r 4); every linear layer, PEFT, rsLoRA (r 16); the MLP and the
    head, PEFT, per-module ranks (r 8 and 2)."""
    root = tmp_path_factory.mktemp("tunes")
    qv = add_lora(ours(), LoRAConfig(4, 8.0, targets="query,value"))
    randomize_b(qv, 1)
    save_adapter(qv, root / "qv")
    specs = {"all": dict(r=16, lora_alpha=16, use_rslora=True,
                         target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
             "mlp": dict(r=8, lora_alpha=4, target_modules=["dense_h_to_4h", "lm_head"], rank_pattern={"lm_head": 2})}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(hf_model(SEED), peft.LoraConfig(**spec))
        randomize_b(model, 2 + i)
        model.save_pretrained(root / name)
    return {name: root / name for name in ("qv", "all", "mlp")}


@pytest.fixture(scope="module")
def merged(adapters):
    """{name: PEFT's merged HF model}, None: the HF base."""
    out = {None: hf_model(SEED)}
    for name, path in adapters.items():
        out[name] = peft.PeftModel.from_pretrained(hf_model(SEED), path).merge_and_unload().eval()
    return out


def banked(adapters, model=None, names=("qv", "all", "mlp")):
    model = model if model is not None else ours()
    bank = AdapterBank(model)
    for name in names:
        bank.add(name, adapters[name])
    return model, bank


def padded_forward(model, prompts, rows=None):
    ids, mask = left_pad(prompts, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    if rows is None:
        return model(ids, position_ids=position_ids, attention_mask=mask)
    with model.adapter_bank.rows(rows):
        return model(ids, position_ids=position_ids, attention_mask=mask)


def base_tensors(model) -> dict:
    return {k.replace(".base_layer.", "."): v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- against PEFT
def test_bank_mixed_batch_gives_every_row_its_adapters_logits(adapters, merged):
    model, bank = banked(adapters)
    assert bank.names == ["qv", "all", "mlp"]
    logits = padded_forward(model, PROMPTS, ROWS)  # [B, T, V]
    T = logits.shape[1]
    with torch.no_grad():
        for b, (prompt, name) in enumerate(zip(PROMPTS, ROWS)):
            expected = merged[name](torch.tensor([prompt])).logits[0]  # [len, V], the prompt alone
            assert_rel_close(logits[b, T - len(prompt):], expected, FP32_LOGITS_REL, f"row {b} ({name})")


def test_bank_greedy_generation_equals_each_merged_adapter_alone(adapters, merged):
    model, _ = banked(adapters)
    N = 10
    out = generate(model, PROMPTS, adapters=ROWS, max_new_tokens=N, temperature=0)
    held = Generator(model).generate(PROMPTS, adapters=ROWS, max_new_tokens=N, temperature=0)
    assert torch.equal(out, held)
    for b, (prompt, name) in enumerate(zip(PROMPTS, ROWS)):
        ids = torch.tensor([prompt])
        expected = merged[name].generate(ids, max_new_tokens=N, do_sample=False, pad_token_id=0)[0, len(prompt):]
        row = out[b].tolist()
        assert row[:len(expected)] == expected.tolist(), f"row {b} ({name})"
        assert all(t == 0 for t in row[len(expected):])  # after its eos: padding


def test_bank_one_name_for_every_prompt_and_a_single_row(adapters, merged):
    model, _ = banked(adapters, names=("all",))
    out = generate(model, PROMPTS[:2], adapters="all", max_new_tokens=6, temperature=0)
    for b, prompt in enumerate(PROMPTS[:2]):
        expected = merged["all"].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                          pad_token_id=0)[0, len(prompt):]
        assert out[b, :len(expected)].tolist() == expected.tolist()


@pytest.mark.parametrize("mode, group_size", [("int8", 128), ("int4", 32)])
def test_bank_over_a_quantized_base_equals_load_adapter_alone(adapters, mode, group_size):
    """(mlp's file holds PEFT's copy of the float lm_head, which a quantized embed_out cannot be checked against)"""
    model, _ = banked(adapters, quantize(ours(), mode, group_size=group_size), names=("qv", "all"))
    rows = ["qv", None, "all", "all", "qv"]
    logits = padded_forward(model, PROMPTS, rows)
    for name in ("qv", "all", None):
        alone = quantize(ours(), mode, group_size=group_size)
        if name is not None:
            load_adapter(alone, adapters[name])
        expected = padded_forward(alone, PROMPTS)
        for b in [b for b, n in enumerate(rows) if n == name]:
            assert_rel_close(logits[b], expected[b], FP32_LOGITS_REL, f"{mode} row {b} ({name})")


# ------------------------------------------------------------------------------------------ the base, bit for bit
def test_bank_never_touches_the_base_weights_and_base_rows_are_the_bases_bit_for_bit(adapters):
    model = ours()
    before = base_tensors(model)
    plain = padded_forward(model, PROMPTS)
    bank = AdapterBank(model)
    for step in [("add", "qv"), ("add", "all"), ("remove", "qv"), ("add", "mlp"), ("add", "qv"), ("remove", "all"),
                 ("remove", "mlp"), ("add", "all")]:
        getattr(bank, step[0])(*step[1:] + ((adapters[step[1]],) if step[0] == "add" else ()))
        after = base_tensors(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), step
    assert bank.names == ["qv", "all"]
    assert torch.equal(padded_forward(model, PROMPTS), plain)  # no rows context: the base
    assert torch.equal(padded_forward(model, PROMPTS, [None] * len(PROMPTS)), plain)
    mixed = padded_forward(model, PROMPTS, ["qv", None, "all", -1, "qv"])
    assert torch.equal(mixed[[1, 3]], plain[[1, 3]])  # rows of the base cost nothing and change nothing
    assert not torch.allclose(mixed[0], plain[0])
    bank.close()
    assert model.adapter_bank is None and not any(isinstance(m, BankLinear) for m in model.modules())
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert torch.equal(padded_forward(model, PROMPTS), plain)


def test_bank_remove_then_add_again_gives_the_same_logits_and_slot(adapters):
    model, bank = banked(adapters)
    first = padded_forward(model, PROMPTS, ROWS)
    slot = bank.index("all")
    bank.remove("all")
    assert bank.names == ["qv", "mlp"]
    with pytest.raises(ValueError, match="no adapter named 'all' in the bank"):
        padded_forward(model, PROMPTS, ROWS)
    assert bank.add("all", adapters["all"]) == slot  # the freed slot is reused
    assert torch.equal(padded_forward(model, PROMPTS, ROWS), first)
    by_slot = [bank.index(n) if n else -1 for n in ROWS]
    assert torch.equal(padded_forward(model, PROMPTS, torch.tensor(by_slot)), first)


# --------------------------------------------------------------------------------------------------- engine
class DigitsTokenizer:
    end_key_id = None

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_engine_requests_carry_their_adapter(adapters):
    model, bank = banked(adapters)
    expected = generate(model, PROMPTS, adapters=ROWS, max_new_tokens=6, temperature=0).tolist()
    engine = Engine(model, DigitsTokenizer(), max_batch_size=3).start()  # 5 requests, 3 slots: slots are reused
    try:
        done = threading.Semaphore(0)

        def emit(e):
            if e.kind in ("done", "error"):
                done.release()

        requests = [Request(p, GenerationConfig(max_new_tokens=6, temperature=0), emit, adapter=a)
                    for p, a in zip(PROMPTS, ROWS)]
        for r in requests:
            assert engine.submit(r)
        for _ in requests:
            assert done.acquire(timeout=60)
        for b, r in enumerate(requests):
            assert r.finish_reason in ("stop", "length"), r.finish_reason
            assert r.tokens == expected[b][:len(r.tokens)], f"row {b}"
        with pytest.raises(ValueError, match="no adapter named 'nope'"):
            engine.submit(Request(PROMPTS[0], GenerationConfig(max_new_tokens=2), lambda e: None, adapter="nope"))
    finally:
        engine.stop()


def test_engine_request_whose_adapter_leaves_the_bank_fails_alone(adapters):
    model, bank = banked(adapters)
    engine = Engine(model, DigitsTokenizer(), max_batch_size=2)  # not started: the test drives its steps
    events = {"qv": [], "all": []}
    requests = [Request(PROMPTS[0], GenerationConfig(max_new_tokens=8, temperature=0), events[a].append, adapter=a)
                for a in events]
    for r in requests:
        engine._admit(r)
    engine._step()  # both prompts prefilled: a first token each
    bank.remove("qv")
    engine._step()
    assert events["qv"][-1].kind == "error" and "'qv' was removed from the bank" in events["qv"][-1].message
    assert [e.kind for e in events["all"]] == ["token", "token"] and engine.rows == [None, requests[1]]


def test_stream_takes_the_prompts_adapter(adapters):
    model, _ = banked(adapters)
    tok = DigitsTokenizer()
    row = generate(model, PROMPTS[2:3], adapters=["all"], max_new_tokens=6, temperature=0)[0].tolist()
    text = "".join(stream(model, tok, PROMPTS[2], adapters=["all"], max_new_tokens=6, temperature=0))
    assert text and text == completion_text(tok, row, stop_ids(model))
    assert "".join(Generator(model).stream(tok, PROMPTS[2], adapters="all", max_new_tokens=6, temperature=0)) == (
        completion_text(tok, row, stop_ids(model)))


# ----------------------------------------------------------------------------------------------- refusals
def test_bank_refusals_say_what_to_do(adapters, tmp_path):
    plain = ours()
    with pytest.raises(ValueError, match="adapters= needs an AdapterBank"):
        generate(plain, PROMPTS, adapters=ROWS, max_new_tokens=2)
    model, bank = banked(adapters, names=("qv",))
    with pytest.raises(ValueError, match="the model already has an AdapterBank"):
        AdapterBank(model)
    with pytest.raises(ValueError, match="already holds an adapter named 'qv'"):
        bank.add("qv", adapters["qv"])
    with pytest.raises(ValueError, match="adapters names 2 rows, but there are 5 prompts"):
        generate(model, PROMPTS, adapters=["qv", None], max_new_tokens=2)
    with pytest.raises(ValueError, match="no adapter named 'all' in the bank \\(it holds 'qv'\\)"):
        generate(model, PROMPTS, adapters="all", max_new_tokens=2)
    with pytest.raises(ValueError, match="runs uncompiled and without a draft model"):
        generate(model, PROMPTS, adapters="qv", max_new_tokens=2, compile=True)
    with pytest.raises(ValueError, match="the adapter rows name 2 rows, the forward has a batch of 5"):
        padded_forward(model, PROMPTS, ["qv", None])
    resized = add_lora(ours(vocab_size=120), LoRAConfig(4, 8.0))
    save_adapter(resized, tmp_path / "dolly")
    with pytest.raises(AdapterError, match="vocabulary of 120 rows, the model has 101; an AdapterBank cannot resize"):
        bank.add("dolly", tmp_path / "dolly")
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "adapter_config.json").write_bytes((adapters["all"] / "adapter_config.json").read_bytes())
    tensors = load_file(adapters["all"] / "adapter_model.safetensors")
    tensors["base_model.model.gpt_neox.embed_in.weight"] = torch.zeros(101, 64)
    save_file(tensors, tmp_path / "emb" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="replaces a whole embedding matrix"):
        bank.add("emb", tmp_path / "emb")
    before = base_tensors(model)
    with pytest.raises(AdapterError):  # an adapter of another shape: refused before the bank changes
        bank.add("wide", _adapter_of_another_width(tmp_path))
    assert bank.names == ["qv"] and all(torch.equal(v, before[k]) for k, v in base_tensors(model).items())


def _adapter_of_another_width(tmp_path):
    other = add_lora(ours(hidden_size=32, intermediate_size=128), LoRAConfig(4, 8.0))
    save_adapter(other, tmp_path / "wide")
    return tmp_path / "wide"
