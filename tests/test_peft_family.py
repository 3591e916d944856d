"""peft_family.py: parameter counts match peft, the QLoRA guard holds, runs work in fresh processes."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from ftcourse import evaluate, memory, peft_family, profiles

CPU = profiles.PROFILES["cpu"]
SIZES = peft_family.RUN_SIZES["cpu"]
TINY = dataclasses.replace(SIZES, steps=2, batch_size=2, eval_per_family=1, heldout_docs=1)
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

    from ftcourse import evaluate

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


def test_run_in_a_fresh_process_trains_measures_and_stays_offline(no_network):
    result = peft_family.run_in_fresh_process("LoRA", 0, CPU, TINY, TEXTS)
    assert result.ok, result.error
    assert no_network == []  # a forked child shares the patched socket module
    assert result.trainable == 155_648 and result.total > result.trainable
    assert result.peak_mib >= result.start_mib > 0
    assert len(result.chat_hits) == len(result.raw_hits) == 4
    assert result.perplexity > 1 and result.cpu_seconds > 0


def test_run_method_in_process_stays_offline(no_network):
    result = peft_family.run_method("IA3", 0, CPU, TINY, TEXTS)
    assert result.ok, result.error
    assert no_network == []
    assert result.trainable == 4 * (128 + 128 + 768)  # l_k, l_v and l_ff in each of the four blocks


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


def test_summary_by_hand():
    base = peft_family.Baseline((True, False, False, False), (True, True, False, False), 6.0)
    runs = [
        peft_family.MethodResult("A", 0, 10, 100, 1e-3, 1.0, 3.0, 0.1, 1.0, (True,) * 4, (True,) * 4, 5.0),
        peft_family.MethodResult("A", 1, 10, 100, 1e-3, 1.0, 5.0, 0.3, 1.0, (False,) * 4, (False,) * 4, 7.0),
        peft_family.MethodResult("B", 0, error="ValueError: bad"),
    ]
    a, b = peft_family.summary(runs, base)
    assert a["chat_per_seed"] == [1.0, 0.0] and a["seeds"] == 2 and a["chat_mean"] == 0.5
    assert (a["chat_min"], a["chat_max"], a["chat_first"], a["first_seed"]) == (0.0, 1.0, 1.0, 0)
    assert a["raw_change"] == pytest.approx(0.5 - 0.5)  # mean of 100% and 0% against the base's 50%
    assert a["peak_mib"] == 4.0 and a["perplexity"] == 6.0 and a["trainable_share"] == 0.1
    # Seed 0: 3 discordant items, all for A: 2 * 0.5**3. Seed 1: 1 discordant item, for the base: 1.0.
    assert a["p_per_seed"] == pytest.approx([0.25, 1.0])
    assert (a["chat_low"], a["chat_high"]) == pytest.approx(evaluate.wilson_interval(4, 4))
    assert b == {"method": "B", "error": "ValueError: bad", "seeds": 1}
    frame = peft_family.summary_frame([a, b], base)
    assert frame.loc["B", "error"] == "ValueError: bad"
    assert frame.loc["A", "chat EM % (mean)"] == "50" and frame.loc["A", "per seed"] == "100, 0"
    assert frame.loc["A", "p vs base, per seed"] == "0.25, 1"


def test_a_seed_that_fails_keeps_the_others_and_shows_its_error():
    base = peft_family.Baseline((False,) * 4, (True,) * 4, 6.0)
    runs = [
        peft_family.MethodResult("A", 0, 10, 100, 1e-3, 1.0, 3.0, 0.1, 1.0, (True,) * 4, (True,) * 4, 5.0),
        peft_family.MethodResult("A", 1, error="RuntimeError: out of memory"),
    ]
    (row,) = peft_family.summary(runs, base)
    assert row["seeds"] == 1 and row["chat_per_seed"] == [1.0]
    assert row["error"] == "RuntimeError: out of memory"


def test_every_profile_trains_every_method_with_at_least_two_seeds_except_minimal():
    for name, sizes in peft_family.RUN_SIZES.items():
        assert len(sizes.seeds) >= (1 if name == "minimal" else 2), name


def test_family_sizes_follow_the_minimal_setting():
    minimal = dataclasses.replace(CPU, minimal=True)
    assert peft_family.family_sizes(minimal) is peft_family.RUN_SIZES["minimal"]
    assert peft_family.family_sizes(CPU) is peft_family.RUN_SIZES["cpu"]


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


def test_accuracy_plot_labels_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    points = [
        ("LoRA", 155_648, [0.2, 0.2]),
        ("QLoRA", 155_648, [0.25, 0.25]),
        ("DoRA", 165_888, [0.15, 0.25]),
    ]
    points += [("AdaLoRA", 233_808, [0.2, 0.2]), ("IA3", 4096, [0.2, 0.15]), ("VeRA", 4096, [0.2, 0.2])]
    rows = [
        {"method": name, "trainable": n, "chat_per_seed": s, "chat_mean": sum(s) / 2}
        | {"chat_min": min(s), "chat_max": max(s), "seeds": 2}
        for name, n, s in points
    ]
    figure = peft_family.accuracy_vs_parameters(rows, peft_family.Baseline((True, False), (True, True), 5.0))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in figure.axes[0].texts if t.get_text() != "base model"]
    assert len(boxes) == 6  # six methods on six distinct points: one label each
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
