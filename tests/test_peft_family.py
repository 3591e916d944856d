"""peft_family.py: parameter counts match peft, the QLoRA guard holds, runs work in fresh processes."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from ftcourse import data, evaluate, heldout, memory, peft_family, profiles

CPU = profiles.PROFILES["cpu"]
SIZES = peft_family.RUN_SIZES["cpu"]
FOCUS = peft_family.FOCUS_SIZES["cpu"]
TINY = dataclasses.replace(FOCUS, steps=2, batch_size=2, eval_per_family=1, heldout_docs=1)
TEXTS = ["max of 3 5 9 is 9 . the capital of Orlia is Venn ."]  # perplexity text; no corpus rebuild


@pytest.fixture(scope="module")
def toy_architecture():
    return memory.architecture(profiles.load_base(profile=CPU).config)


@pytest.mark.parametrize(
    "name",
    [
        "full fine-tuning",
        "feature extraction",
        "BitFit (as added biases)",
        "prompt tuning",
        "prefix tuning",
        "IA3",
        "LoRA",
    ],
)
def test_trainable_at_scale_matches_peft_on_the_embedded_model(name, toy_architecture):
    from peft import get_peft_model

    model, config = peft_family.prepare(peft_family.method(name), CPU, SIZES)
    if config is not None:
        model = get_peft_model(model, config)
    measured, _ = peft_family.trainable_parameters(model)
    assert peft_family.trainable_at_scale(toy_architecture, name, SIZES) == measured


def test_trainable_at_scale_by_hand_for_lora_on_llama_8b():
    # One Llama-3.1-8B layer: q, o 4096x4096; k, v 1024x4096; gate, up 14336x4096; down 4096x14336.
    per_layer = 8 * ((4096 + 4096) * 2 + (1024 + 4096) * 2 + (14336 + 4096) * 3)
    assert (
        peft_family.trainable_at_scale(memory.architecture("llama-3.1-8b"), "LoRA", SIZES) == 32 * per_layer
    )


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="no method called 'LoRB'.*LoRA"):
        peft_family.method("LoRB")


def test_load_4bit_disables_the_avx512bf16_path_and_keeps_weights_exact():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    model = peft_family.load_4bit(CPU)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    layer = layers[0]
    before = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    with torch.no_grad():  # eval mode, an input without grad: the path that repacked weights in 0.50.2
        model.eval()(input_ids=torch.tensor([[5, 6, 7, 8]]))
    after = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(before, after)


def test_adalora_allocator_passes_the_zero_based_step_after_the_optimizer_step():
    calls = []
    model = SimpleNamespace(base_model=SimpleNamespace(update_and_allocate=calls.append))
    callback = peft_family.adalora_allocator()
    for finished in range(3):  # Trainer calls on_optimizer_step before it increments global_step
        callback.on_optimizer_step(None, SimpleNamespace(global_step=finished), None, model=model)
    assert calls == [0, 1, 2]


def test_peak_rss_sees_an_allocation_after_a_reset():
    memory.reset_peak_rss()
    start = memory.rss_mib()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = memory.peak_rss_mib()
    del block
    assert peak - start > 50


def test_perplexity_of_a_prompt_tuned_model_drops_the_virtual_positions():
    import torch.nn.functional as F
    from peft import get_peft_model

    model, config = peft_family.prepare(peft_family.method("prompt tuning"), CPU, SIZES)
    tuned = get_peft_model(model, config).eval()
    tokenizer = profiles.load_tokenizer(profile=CPU)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        logits = tuned(input_ids=ids).logits  # (1, n_virtual + T, V)
    assert logits.shape[1] == ids.shape[1] + config.num_virtual_tokens
    by_hand = F.cross_entropy(logits[0, config.num_virtual_tokens : -1], ids[0, 1:]).exp().item()
    wrapped = peft_family._WithoutVirtualTokens(tuned, config.num_virtual_tokens)
    # Both sum n float32 token losses (in another order) and exponentiate the mean: the mean NLL is good
    # to n·eps relative, which exp turns into |mean NLL|·n·eps relative on the perplexity.
    n_tokens = ids.shape[1] - 1
    rel = abs(math.log(by_hand)) * n_tokens * torch.finfo(torch.float32).eps
    assert evaluate.perplexity(wrapped, tokenizer, TEXTS) == pytest.approx(by_hand, rel=rel)


def _source_log(monkeypatch, tmp_path) -> object:
    log = tmp_path / "sources.jsonl"
    monkeypatch.setenv(profiles.SOURCE_LOG_ENV, str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_run_in_a_fresh_process_trains_measures_and_stays_offline(no_network, monkeypatch, tmp_path):
    read = _source_log(monkeypatch, tmp_path)
    result = peft_family.run_in_fresh_process("LoRA", 0, CPU, TINY, TEXTS)
    assert result.ok, result.error
    assert no_network == []  # a forked child shares the patched socket module
    assert result.trainable == 155_648 and result.total > result.trainable
    assert result.peak_mib >= result.start_mib > 0
    assert len(result.chat_hits) == len(result.raw_hits) == 4
    assert result.perplexity > 1 and result.cpu_seconds > 0
    # The child inherits the environment: its training and scores land in the parent's source log.
    uses = [(e["use"], e["source"]) for e in read()]
    assert ("train", profiles.TASK_WORLD) in uses and ("score", profiles.TASK_WORLD) in uses
    # one score (the chat form); the raw form, with the adapter and without, is a capability check
    assert (
        uses.count(("score", profiles.TASK_WORLD)) == 1
        and uses.count(("capability", profiles.TASK_WORLD)) == 2
    )


def test_run_method_in_process_stays_offline(no_network):
    result = peft_family.run_method("IA3", 0, CPU, TINY, TEXTS, learning_rate=0.5)
    assert result.ok, result.error
    assert no_network == []
    assert result.trainable == 4 * (128 + 128 + 768)  # l_k, l_v and l_ff in each of the four blocks
    assert result.learning_rate == 0.5 and len(result.raw_hits_bare) == 4
    with pytest.raises(ValueError, match="learning_rate must be positive, got 0"):
        peft_family.run_method("IA3", 0, CPU, TINY, TEXTS, learning_rate=0)


def test_scores_of_a_prompt_tuned_model_read_the_real_tokens_and_keep_its_mode():
    import torch.nn.functional as F
    from peft import get_peft_model

    model, config = peft_family.prepare(peft_family.method("prompt tuning"), CPU, SIZES)
    tuned = get_peft_model(model, config).train()
    tokenizer = profiles.load_tokenizer(profile=CPU)
    wrapped = peft_family._WithoutVirtualTokens(tuned, config.num_virtual_tokens)
    record = data.task_records("test", "messages", 1)[0]
    (score,) = heldout.row_scores(wrapped, tokenizer, [record], "messages")
    assert wrapped.training and tuned.training  # scored in eval mode, then given back in training mode
    # By hand: the reply's tokens after the prompt, predicted from the logits of the real positions only.
    turns = record["messages"]
    full = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(
        turns[:-1], tokenize=True, add_generation_prompt=True, return_dict=True
    )
    start = len(prompt["input_ids"])
    with torch.no_grad():
        logits = tuned.eval()(input_ids=torch.tensor([full])).logits[0, config.num_virtual_tokens : -1]
    logprobs = F.log_softmax(logits.float(), -1).gather(1, torch.tensor(full[1:])[:, None])[:, 0]
    assert score == pytest.approx(logprobs[start - 1 :].mean().item(), abs=1e-5)


HUB = "example/hub-chat"


def _hub_rows(n: int) -> heldout.HeldOut:
    rows = [{**r, "category": "Chat"} for r in data.task_records("test", "messages", 2)][:n]
    return heldout.HeldOut(HUB, "test", "messages", tuple(rows))


def test_measure_scores_hub_rows_by_likelihood_and_the_raw_form_as_a_capability(monkeypatch, tmp_path):
    read = _source_log(monkeypatch, tmp_path)
    monkeypatch.setattr(heldout, "heldout_set", lambda schema, per_family, profile=None: _hub_rows(5))
    tokenizer = profiles.load_tokenizer(profile=CPU)
    base_model = profiles.load_base(profile=CPU)
    base = peft_family.baseline(base_model, tokenizer, TINY, TEXTS, CPU)
    assert base.schema == "messages" and len(base.chat_hits) == len(base.items) == 5
    assert base.chat_hits == pytest.approx(
        heldout.row_scores(base_model, tokenizer, _hub_rows(5).rows, "messages")
    )
    assert len(base.raw_hits) == len(base.raw_items) == 4 and base.units("raw") == base.raw_items
    uses = {(e["use"], e["source"]) for e in read()}
    assert ("score", HUB) in uses and ("score", profiles.TASK_WORLD) not in uses
    assert ("capability", profiles.TASK_WORLD) in uses
    # Chat rows and raw-form questions differ in number: each comparison pairs its own units.
    runs = [_result("A", 0, tuple(h + 0.5 for h in base.chat_hits), (True,) * 4)]
    chat = peft_family.pooled_difference(runs, "A", peft_family.BASE, base)
    raw = peft_family.pooled_difference(runs, "A", peft_family.BASE, base, "raw")
    assert chat.unit == "held-out row" and chat.n_units == 5 and chat.estimate == pytest.approx(0.5)
    assert raw.unit == "item" and raw.n_observations == 4
    (row,) = peft_family.summary(runs, base)
    frame = peft_family.summary_frame([row], base)
    assert "chat EM % (mean)" not in frame.columns and frame.loc["A", "chat vs base, nats/token [95% CI]"]
    assert frame.loc[peft_family.BASE, "chat log-prob (mean)"] == f"{sum(base.chat_hits) / 5:.3f}"


def test_a_soft_prompt_switched_off_leaves_exactly_the_base_model():
    result = peft_family.run_method("prompt tuning", 0, CPU, TINY, TEXTS)
    assert result.ok, result.error
    tokenizer = profiles.load_tokenizer(profile=CPU)
    base_raw = peft_family.raw_form_hits(profiles.load_base(profile=CPU), tokenizer, TINY)
    assert result.raw_hits_bare == base_raw


def test_a_cost_only_run_trains_and_skips_evaluation():
    sizes = dataclasses.replace(SIZES, steps=2, batch_size=2)
    result = peft_family.run_method("LoRA", 0, CPU, sizes, TEXTS)
    assert result.ok, result.error
    assert result.chat_hits == () and math.isnan(result.perplexity) and result.step_seconds > 0


def test_a_failing_method_comes_back_with_its_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such layer")

    monkeypatch.setattr(peft_family, "prepare", broken)
    result = peft_family.run_in_fresh_process("LoRA", 0, CPU, TINY, TEXTS)
    assert not result.ok and result.error.startswith("RuntimeError: no such layer")


def test_a_skipped_method_says_why():
    sizes = dataclasses.replace(TINY, skip={"LoRA": "too big"})
    result = peft_family.run_in_fresh_process("LoRA", 0, CPU, sizes, TEXTS)
    assert "too big" in result.error


ITEMS = ("add/1+2", "add/1+2", "max/3 5", "count/a b")  # the first item asked in two phrasings


def _result(
    name: str, seed: int, chat: tuple[bool, ...], raw: tuple[bool, ...], **kw
) -> peft_family.MethodResult:
    return peft_family.MethodResult(name, seed, 10, 100, 1e-3, 1.0, 3.0, 0.1, 1.0, chat, raw, 5.0, **kw)


def test_pooled_difference_averages_seeds_per_item_by_hand():
    base = peft_family.Baseline((False,) * 4, (True,) * 4, 6.0, ITEMS)
    runs = [
        _result("A", 0, (True, True, True, False), (True,) * 4),
        _result("A", 1, (True, False, True, False), (True,) * 4),
        _result("B", 0, (False,) * 4, (True,) * 4),
        _result("B", 1, (False,) * 4, (True,) * 4),
    ]
    d = peft_family.pooled_difference(runs, "A", peft_family.BASE, base)
    # per item, A's answers over two seeds (and two phrasings of add/1+2): 3/4, 1, 0; the base 0 everywhere
    assert d.unit == "item" and d.n_units == 3 and d.n_observations == 8
    assert d.estimate == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert peft_family.pooled_difference(runs, "A", "B", base).estimate == pytest.approx(d.estimate)
    assert peft_family.pooled_difference(runs, "A", peft_family.BASE, base, "raw").estimate == 0.0
    with pytest.raises(ValueError, match="no finished run of 'C'"):
        peft_family.pooled_difference(runs, "C", peft_family.BASE, base)
    with pytest.raises(ValueError, match="no item labels"):
        peft_family.pooled_difference(runs, "A", "B", peft_family.Baseline((False,) * 4, (True,) * 4, 6.0))


def test_pooled_difference_uses_only_the_seeds_both_finished():
    base = peft_family.Baseline((False,) * 4, (True,) * 4, 6.0, ITEMS)
    runs = [
        _result("A", 0, (True,) * 4, (True,) * 4),
        _result("A", 1, (False,) * 4, (True,) * 4),
        _result("B", 0, (False,) * 4, (True,) * 4),
        peft_family.MethodResult("B", 1, error="RuntimeError: out of memory"),
    ]
    d = peft_family.pooled_difference(runs, "A", "B", base)
    assert d.n_observations == 4 and d.estimate == 1.0  # seed 1 of A has no partner and is left out


def test_summary_by_hand():
    base = peft_family.Baseline((True, False, False, False), (True, True, False, False), 6.0, ITEMS)
    runs = [
        _result("A", 0, (True,) * 4, (True,) * 4, raw_hits_bare=(True, True, False, False)),
        _result("A", 1, (False,) * 4, (False,) * 4, raw_hits_bare=(True, True, False, False)),
        peft_family.MethodResult("B", 0, error="ValueError: bad"),
    ]
    a, b = peft_family.summary(runs, base)
    assert a["chat_per_seed"] == [1.0, 0.0] and a["seeds"] == 2 and a["chat_mean"] == 0.5
    assert a["raw_mean"] == 0.5 and a["perplexity"] == 5.0 and a["trainable_share"] == 0.1
    assert a["bare_is_base"] is True
    # per item: add/1+2 (base 1/2 right, A 1/2), max (0 and 1/2), count (0 and 1/2): +0, +1/2, +1/2
    assert a["chat_vs_base"].estimate == pytest.approx(1 / 3) and a["chat_vs_base"].n_units == 3
    assert b == {"method": "B", "error": "ValueError: bad", "seeds": 1}
    frame = peft_family.summary_frame([a, b], base)
    assert frame.loc["B", "error"] == "ValueError: bad"
    assert frame.loc["A", "chat EM % (mean)"] == "50" and frame.loc["A", "per seed"] == "100, 0"
    assert frame.loc[peft_family.BASE, "raw EM % (mean)"] == "50"


def test_a_seed_that_fails_keeps_the_others_and_shows_its_error():
    base = peft_family.Baseline((False,) * 4, (True,) * 4, 6.0, ITEMS)
    runs = [
        _result("A", 0, (True,) * 4, (True,) * 4),
        peft_family.MethodResult("A", 1, error="RuntimeError: out of memory"),
    ]
    (row,) = peft_family.summary(runs, base)
    assert row["seeds"] == 1 and row["chat_per_seed"] == [1.0]
    assert row["error"] == "RuntimeError: out of memory"


def test_cost_frame_shows_costs_and_errors():
    runs = [_result("A", 0, (), ()), peft_family.MethodResult("B", 0, error="ValueError: bad")]
    frame = peft_family.cost_frame(runs)
    assert frame.loc["A", "trainable"] == "10" and frame.loc["A", "peak MiB"] == "3"
    assert frame.loc["B", "error"] == "ValueError: bad"


def test_the_focused_comparison_has_two_seeds_and_evaluates_except_minimal():
    assert set(peft_family.FOCUS_SIZES) == set(peft_family.RUN_SIZES)
    for name, sizes in peft_family.FOCUS_SIZES.items():
        assert len(sizes.seeds) >= (1 if name == "minimal" else 2), name
        assert sizes.measure_quality
    assert all(not sizes.measure_quality for sizes in peft_family.RUN_SIZES.values())  # cost only
    assert all(peft_family.method(name) for name in peft_family.FOCUS_METHODS)


def test_family_sizes_follow_the_minimal_setting():
    minimal = dataclasses.replace(CPU, minimal=True)
    assert peft_family.family_sizes(minimal) is peft_family.RUN_SIZES["minimal"]
    assert peft_family.family_sizes(CPU) is peft_family.RUN_SIZES["cpu"]
    assert peft_family.focus_sizes(minimal) is peft_family.FOCUS_SIZES["minimal"]
    assert peft_family.focus_sizes(CPU) is peft_family.FOCUS_SIZES["cpu"]


@pytest.mark.parametrize("steps", [1, 2, 10, 300])
def test_the_adalora_schedule_is_valid_for_any_step_count(steps):
    sizes = dataclasses.replace(SIZES, steps=steps)
    config = peft_family._adalora(sizes, CPU)  # peft validates the schedule when the config is built
    assert config.tinit < config.total_step - config.tfinal


def test_warm_up_trains_a_tiny_model_and_leaves_no_frozen_objects():
    import gc

    peft_family.warm_up(CPU)
    assert gc.get_freeze_count() == 0


def test_run_fresh_unfreezes_the_collector_even_when_a_run_fails(monkeypatch):
    import gc

    def broken(*args, **kwargs):
        raise RuntimeError("child could not start")

    monkeypatch.setattr(peft_family, "warm_up", lambda profile=None: None)
    monkeypatch.setattr(peft_family, "run_in_fresh_process", broken)
    with pytest.raises(RuntimeError, match="child could not start"):
        peft_family.run_fresh(["LoRA"], CPU, TINY, TEXTS)
    assert gc.get_freeze_count() == 0


def test_measure_generates_only_the_reply_tokens_the_sizes_allow(monkeypatch):
    from ftcourse import evaluate as ev

    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=32):
        seen["max_new_tokens"] = max_new_tokens
        return ["x"] * len(prompts)

    monkeypatch.setattr(ev, "generate", fake_generate)
    monkeypatch.setattr(ev, "perplexity", lambda *args, **kwargs: 2.0)
    tokenizer = profiles.load_tokenizer(profile=CPU)
    sizes = dataclasses.replace(TINY, reply_tokens=3)
    peft_family.measure(object(), tokenizer, sizes, CPU, TEXTS)
    assert seen["max_new_tokens"] == 3
