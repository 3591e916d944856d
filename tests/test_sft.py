"""sft.py: the quick LoRA SFT must visibly change the embedded model; train_sft must not touch its input."""

from __future__ import annotations

import json

import pytest
import torch

from ftcourse import data, evaluate, profiles, sft
from ftcourse.toy.tasks import build_tasks

BASE_CEILING = 0.20  # the base model must do poorly on chat-form tasks...
TUNED_FLOOR = 0.80  # ...and a quick LoRA SFT must lift held-out accuracy far
CPU = profiles.PROFILES["cpu"]


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer(profile=CPU)


@pytest.fixture(scope="module")
def tiny_dataset():
    return data.load_records("messages", "train", size=32, profile=CPU)


@pytest.fixture(scope="module")
def before_and_after(tokenizer):
    tasks = build_tasks("test", per_family=CPU.eval_per_family)
    base = evaluate.exact_match(profiles.load_base(profile=CPU), tokenizer, tasks)
    run = sft.quick_sft(CPU)  # trains once per checkout, then reloads from _build/ftcourse-cache
    tuned = evaluate.exact_match(run.model, tokenizer, tasks)
    with run.model.disable_adapter():
        base_again = evaluate.exact_match(run.model, tokenizer, tasks)
    return base, tuned, base_again, run


def test_base_model_fails_the_chat_form(before_and_after):
    base, *_ = before_and_after
    assert base.overall <= BASE_CEILING, base


def test_quick_lora_sft_lifts_held_out_accuracy(before_and_after):
    _, tuned, _, run = before_and_after
    assert tuned.overall >= TUNED_FLOOR, tuned
    assert 0 < run.trainable_parameters < 0.1 * run.total_parameters


def test_disabling_the_adapter_gives_the_base_model_back(before_and_after):
    base, _, base_again, _ = before_and_after
    assert base_again == base


def test_quick_run_records_its_whole_recipe(before_and_after):
    *_, run = before_and_after
    for key in ("lora_rank", "lora_alpha", "targets", "learning_rate", "steps", "batch_size", "scheduler"):
        assert key in run.recipe, key
    for key in ("warmup_steps", "max_length", "assistant_only_loss", "seed"):
        assert key in run.recipe, key
    assert run.recipe["steps"] == sft.QUICK_RECIPES["cpu"]["steps"]
    assert run.losses and run.losses[-1][1] < run.losses[0][1]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_sft_leaves_its_input_model_untouched(tokenizer, tiny_dataset):
    model = profiles.load_base(profile=CPU)
    before = _state(model)
    run = sft.lora_sft(model, tokenizer, tiny_dataset, steps=2, batch_size=4, progress=False, profile=CPU)
    assert run.model is not model
    assert not any("lora_" in name for name, _ in model.named_modules())
    after = _state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ...while the copy really trained: some LoRA B matrix left its zero initialisation
    lora_b = [p for n, p in run.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_full_fine_tuning_trains_every_parameter(tokenizer, tiny_dataset):
    model = profiles.load_base(profile=CPU)
    run = sft.train_sft(model, tokenizer, tiny_dataset, steps=2, batch_size=4, progress=False, profile=CPU)
    assert run.recipe["method"] == "full"
    assert run.trainable_parameters == run.total_parameters == sum(p.numel() for p in model.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), run.model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_train_sft_makes_no_network_call(tokenizer, tiny_dataset, no_network):
    model = profiles.load_base(profile=CPU)
    eval_set = data.load_records("messages", "test", size=8, profile=CPU)
    run = sft.lora_sft(
        model, tokenizer, tiny_dataset, steps=2, batch_size=4, eval_dataset=eval_set, eval_steps=1,
        logging_steps=1, progress=False, profile=CPU,
    )  # fmt: skip
    assert no_network == []
    assert [step for step, _ in run.eval_losses] == [1, 2]


def test_every_n_steps_callback_sees_the_training_model(tokenizer, tiny_dataset):
    seen = sft.every_n_steps(2, lambda model, step: (step, model.training))
    model = profiles.load_base(profile=CPU)
    sft.lora_sft(model, tokenizer, tiny_dataset, steps=4, batch_size=4, callbacks=[seen], progress=False)
    assert seen.results == [(2, (2, False)), (4, (4, False))]
    with pytest.raises(ValueError, match="positive number of steps"):
        sft.every_n_steps(0, print)


def test_quick_sft_reload_gives_identical_outputs(tokenizer, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv(sft.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sft.QUICK_RECIPES, "cpu", {**sft.QUICK_RECIPES["cpu"], "steps": 2, "batch_size": 4})
    trained = sft.quick_sft(CPU)
    folder = sft.quick_cache_dir(CPU)
    assert (folder / "adapter_model.safetensors").is_file()
    assert json.loads((folder / "run.json").read_text())["recipe"]["steps"] == 2
    reloaded = sft.quick_sft(CPU)
    batch = tokenizer(["max: 3 9 4\n", "add: 2 + 5\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        first = trained.model(**batch).logits
        second = reloaded.model(**batch).logits
    assert torch.equal(first, second)
    assert reloaded.losses == trained.losses and reloaded.recipe == trained.recipe
    assert no_network == []
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no partial folder left behind


def test_cache_key_changes_with_the_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv(sft.CACHE_ENV, str(tmp_path))
    first = sft.quick_cache_dir(CPU, seed=0)
    assert sft.quick_cache_dir(CPU, seed=1) != first
    monkeypatch.setitem(sft.QUICK_RECIPES, "cpu", {**sft.QUICK_RECIPES["cpu"], "learning_rate": 1e-3})
    assert sft.quick_cache_dir(CPU, seed=0) != first
    assert first.parent == tmp_path


def test_load_adapter_names_a_folder_without_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        sft.load_adapter(None, tmp_path)


def test_packing_changes_nothing_only_when_positions_restart(tokenizer):
    records = list(data.load_records("messages", "train", size=6, profile=CPU))
    losses = sft.packing_losses(profiles.load_base(profile=CPU), tokenizer, records)
    # The same float32 sums in another order: each reply token's loss comes out of attention over up to
    # every token of the batch, laid out differently in the two collations, so n·eps relative with n the
    # batch's tokens (about 2e-5 here, against the 2% that leaking attention costs below).
    n_tokens = sum(len(data.assistant_mask(tokenizer, record["messages"])) for record in records)
    rel = n_tokens * torch.finfo(torch.float32).eps
    assert losses["packed"] == pytest.approx(losses["padded"], rel=rel)
    assert (
        abs(losses["packed, positions not reset"] - losses["padded"]) > 1e-2
    )  # attention leaks across records


def test_sizes_follow_the_profile_and_minimal_sizes():
    from dataclasses import replace

    from ftcourse import profiles

    minimal = replace(profiles.PROFILES["spark"], minimal=True)  # what FTCOURSE_SIZES=minimal gives
    for table in (sft.QUICK_RECIPES, sft.PIPELINE_SIZES):
        assert set(table["minimal"]) == set(table["cpu"]) == set(table["spark"])  # every key everywhere
    assert sft.pipeline_sizes(profiles.PROFILES["cpu"]) == sft.PIPELINE_SIZES["cpu"]
    assert sft.pipeline_sizes(minimal) == sft.PIPELINE_SIZES["minimal"]
    assert sft.quick_recipe(minimal)["steps"] == sft.QUICK_RECIPES["minimal"]["steps"]
    assert sft.quick_recipe(profiles.PROFILES["spark"])["steps"] == sft.QUICK_RECIPES["spark"]["steps"]
    assert sft.quick_cache_dir(minimal) != sft.quick_cache_dir(profiles.PROFILES["spark"])
    for sizes in sft.PIPELINE_SIZES.values():  # the chapter reads losses at these steps and resumes there
        assert sizes["steps"] % sizes["save_steps"] == 0 and sizes["save_steps"] < sizes["steps"]
        assert sizes["alpha_steps"] % sizes["logging_steps"] == 0 and sizes["alpha_steps"] <= sizes["steps"]
        assert (sizes["save_steps"] + sizes["logging_steps"]) <= sizes["steps"]
