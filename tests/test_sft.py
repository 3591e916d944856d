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


# --- max_length: chosen per profile, and what it cuts ------------------------------------------------------


def test_the_profile_picks_max_length():
    from dataclasses import replace

    lengths = [10, 70, 130, 300] * 5
    hub_like = replace(CPU, name="spark-like", uses_network=True)  # a hub profile's rule, no hub needed
    assert sft.pick_max_length(lengths, CPU) == sft.FIXED_MAX_LENGTH == 256  # cpu: as before
    assert sft.pick_max_length(lengths, hub_like) == data.length_limit(lengths) == 320
    assert sft.pick_max_length(lengths, profiles.PROFILES["spark"]) == 320
    assert "max_length_rule" in sft.quick_recipe(profiles.PROFILES["spark"])
    assert "max_length_rule" not in sft.quick_recipe(CPU)  # the cpu quick run's cache key is unchanged


def test_train_sft_refuses_too_many_long_rows_before_building_a_trainer(tokenizer, tiny_dataset, monkeypatch):
    import trl

    def no_trainer(*args, **kwargs):
        raise AssertionError("SFTTrainer was built although the rows are too long")

    monkeypatch.setattr(trl, "SFTTrainer", no_trainer)
    short = min(data.sequence_lengths(tiny_dataset, tokenizer))  # nearly every row is longer
    stops = rf"the training dataset: \d+ of 32 rows.*max_length={short}.*allow_truncation=True"
    with pytest.raises(data.TruncationError, match=stops):  # model=None: nothing is copied or built first
        sft.train_sft(None, tokenizer, tiny_dataset, max_length=short, steps=1, profile=CPU, progress=False)


def test_allowed_truncation_trains_and_reports_it(tokenizer, tiny_dataset, capsys):
    lengths = data.sequence_lengths(tiny_dataset, tokenizer)
    short = sorted(lengths)[len(lengths) // 2]
    model = profiles.load_base(profile=CPU)
    run = sft.lora_sft(model, tokenizer, tiny_dataset, steps=1, batch_size=4, max_length=short,
                       allow_truncation=True, logging_steps=1, progress=False, profile=CPU)  # fmt: skip
    expected = data.check_lengths(lengths, short, allow=True)
    assert run.truncation == expected and run.truncation.rows_cut == sum(n > short for n in lengths) > 0
    assert run.recipe["max_length"] == short and run.losses
    assert capsys.readouterr().out.count(expected.sentence()) == 1


def test_nothing_cut_prints_nothing_and_cpu_keeps_its_fixed_length(tokenizer, tiny_dataset, capsys):
    model = profiles.load_base(profile=CPU)
    run = sft.lora_sft(model, tokenizer, tiny_dataset, steps=1, batch_size=4, progress=False, profile=CPU)
    assert run.recipe["max_length"] == 256 and "max_length_measured" not in run.recipe
    assert run.truncation.rows_cut == 0 and run.truncation.rows == 32
    assert "max_length" not in capsys.readouterr().out


def test_a_hub_profile_measures_max_length_from_the_training_rows(tokenizer, tiny_dataset, no_network):
    from dataclasses import replace

    hub_like = replace(CPU, name="spark-like", uses_network=True)  # the embedded model, a hub profile's rule
    run = sft.lora_sft(profiles.load_base(profile=CPU), tokenizer, tiny_dataset, steps=1, batch_size=4,
                       progress=False, profile=hub_like)  # fmt: skip
    lengths = data.sequence_lengths(tiny_dataset, tokenizer)
    assert run.recipe["max_length"] == data.length_limit(lengths) and run.recipe["max_length_measured"]
    assert run.truncation.share <= data.TRUNCATION_LIMIT
    assert no_network == []


def test_packing_that_splits_rows_is_not_checked(tokenizer, tiny_dataset):
    model = profiles.load_base(profile=CPU)
    run = sft.lora_sft(model, tokenizer, tiny_dataset, steps=1, batch_size=2, max_length=16, packing=True,
                       extra_args={"packing_strategy": "bfd_split"}, progress=False, profile=CPU)  # fmt: skip
    assert run.truncation is None  # bfd_split carries every cut-off token into another row
    with pytest.raises(data.TruncationError):  # TRL's default "bfd" cuts each row, as padding does
        sft.train_sft(model, tokenizer, tiny_dataset, max_length=16, packing=True, steps=1, profile=CPU)


def test_lengths_are_counted_once_per_dataset(tokenizer, tiny_dataset, monkeypatch):
    counted = []
    real = data.sequence_lengths
    monkeypatch.setattr(data, "sequence_lengths", lambda rows, tok: counted.append(1) or real(rows, tok))
    monkeypatch.setattr(sft, "_LENGTHS", {})
    first = sft._training_lengths(tiny_dataset, tokenizer)
    assert sft._training_lengths(tiny_dataset, tokenizer) == first and len(counted) == 1
    assert sft._training_lengths(tiny_dataset.select(range(8)), tokenizer) == first[:8] and len(counted) == 2


def test_the_quick_run_under_the_spark_standins_measures_and_records_max_length(tmp_path, monkeypatch):
    from ftcourse.toy import standin

    for key, value in standin.standin_environment().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(sft.CACHE_ENV, str(tmp_path))  # a fresh quick-run cache; the stand-ins stay put
    spark = profiles.active_profile()
    run = sft.quick_sft(spark)
    rows = data.load_records("messages", "train", profile=spark)
    lengths = data.sequence_lengths(rows, profiles.load_tokenizer(profile=spark))
    measured = data.length_limit(lengths)
    assert run.recipe["max_length"] == measured != sft.QUICK_RECIPES["minimal"]["max_length"]
    assert run.recipe["max_length_measured"] and "max_length_rule" in run.recipe
    assert run.truncation == data.check_lengths(lengths, run.recipe["max_length"])
    again = sft.quick_sft(spark)  # from the cache: the same recipe and the same count
    assert again.recipe == run.recipe and again.truncation == run.truncation


def test_trl_draws_the_same_starting_adapter_as_peft_after_the_same_seed():
    # lora-from-scratch says TRL's run starts from the page's A: TRL seeds (set_seed(args.seed)) right
    # before it wraps the model, as the page does with torch.manual_seed(0). A learning rate of 0 keeps
    # the start; a TRL that stopped seeding there would make the page's sentence false.
    import copy

    from peft import LoraConfig, get_peft_model

    base, tokenizer = profiles.load_base(), profiles.load_tokenizer()
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}
    torch.manual_seed(0)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    records = data.load_records("messages", "train", size=4)
    run = sft.train_sft(
        base, tokenizer, records, peft_config=LoraConfig(**config), steps=1, learning_rate=0.0, batch_size=4,
        warmup_steps=0, seed=0, progress=False,
    )  # fmt: skip
    theirs = {k: v for k, v in run.model.state_dict().items() if "lora_A" in k}
    mine = {k: v for k, v in ours.state_dict().items() if "lora_A" in k}
    assert theirs.keys() == mine.keys() and len(mine) > 0
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)
