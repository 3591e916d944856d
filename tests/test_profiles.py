"""Profile resolution for both profiles, without any network."""

from __future__ import annotations

import pytest

from ftcourse import profiles
from ftcourse.toy import model_dir


def test_default_profile_is_cpu_and_uses_the_embedded_model():
    profile = profiles.active_profile({})
    assert profile.name == "cpu" and not profile.uses_network
    assert profiles.resolve_model("lora", environ={}) == str(model_dir())
    assert profiles.resolve_model("qlora", environ={}) == str(model_dir())


def test_spark_profile_names_real_models_and_hub_datasets():
    env = {"FTCOURSE_PROFILE": "spark"}
    profile = profiles.active_profile(env)
    assert profile.uses_network and profile.dtype == "bfloat16"
    assert profiles.resolve_model("lora", environ=env) == "meta-llama/Llama-3.1-8B-Instruct"
    assert profiles.resolve_model("qlora", environ=env) == "meta-llama/Llama-3.1-70B-Instruct"
    assert set(profile.datasets) == {"alpaca", "messages", "preference", "feedback"}


def test_model_override_wins_on_spark_and_must_be_local_on_cpu(tmp_path):
    spark = {"FTCOURSE_PROFILE": "spark", "FTCOURSE_MODEL": "Qwen/Qwen2.5-7B-Instruct"}
    assert profiles.resolve_model(environ=spark) == "Qwen/Qwen2.5-7B-Instruct"
    assert profiles.resolve_model(environ={"FTCOURSE_MODEL": str(model_dir())}) == str(model_dir())
    with pytest.raises(ValueError, match="never downloads"):
        profiles.resolve_model(environ={"FTCOURSE_MODEL": "meta-llama/Llama-3.1-8B-Instruct"})


def test_profile_name_is_case_insensitive_and_unknown_names_are_refused():
    assert profiles.active_profile({"FTCOURSE_PROFILE": " Spark "}).name == "spark"
    with pytest.raises(ValueError, match="choose one of"):
        profiles.active_profile({"FTCOURSE_PROFILE": "gpu"})
    with pytest.raises(ValueError, match="role must be one of"):
        profiles.resolve_model("dpo", environ={})


def test_describe_names_the_profile_and_the_switch(monkeypatch):
    monkeypatch.delenv("FTCOURSE_PROFILE", raising=False)
    monkeypatch.delenv("FTCOURSE_MODEL", raising=False)
    text = profiles.describe()
    assert "`cpu`" in text and "FTCOURSE_PROFILE=spark" in text and "embedded" in text


def test_model_label_never_shows_a_machine_path(model_copy, monkeypatch):
    monkeypatch.delenv("FTCOURSE_PROFILE", raising=False)
    monkeypatch.delenv("FTCOURSE_MODEL", raising=False)
    assert profiles.model_label() == "embedded tiny Llama (`ftcourse/toy/weights`)"
    monkeypatch.setenv("FTCOURSE_MODEL", str(model_copy))  # a reader's folder: its name, not its path
    assert profiles.model_label() == "model" and str(model_copy) not in profiles.describe()
    monkeypatch.delenv("FTCOURSE_MODEL")
    assert profiles.model_label("qlora", profiles.PROFILES["spark"]) == "meta-llama/Llama-3.1-70B-Instruct"


# --- FTCOURSE_MODEL pointing at something that is not a model -----------------------------------


@pytest.fixture
def model_copy(tmp_path):
    import shutil

    return shutil.copytree(model_dir(), tmp_path / "model")


def test_model_override_expands_the_home_folder(model_copy, monkeypatch):
    monkeypatch.setenv("HOME", str(model_copy.parent))
    assert profiles.resolve_model(environ={"FTCOURSE_MODEL": "~/model"}) == str(model_copy)


def test_model_override_that_is_an_adapter_folder_is_named(model_copy):
    (model_copy / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a PEFT adapter folder, not a model"):
        profiles.resolve_model(environ={"FTCOURSE_MODEL": str(model_copy)})


def test_model_override_without_config_is_named(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        profiles.resolve_model(environ={"FTCOURSE_MODEL": str(model_copy)})


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 8], ids=["empty", "garbage"])
def test_model_override_with_damaged_weights_is_named(model_copy, content):
    (model_copy / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged"):
        profiles.resolve_model(environ={"FTCOURSE_MODEL": str(model_copy)})


# --- The cpu profile never touches the network ----------------------------------------------------


def test_cpu_profile_switches_the_hf_libraries_offline():
    import huggingface_hub.constants

    assert profiles.stay_offline(profiles.PROFILES["cpu"]) is True
    assert huggingface_hub.constants.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY
    assert profiles.stay_offline(profiles.PROFILES["spark"]) is False


def test_lora_sft_makes_no_network_call(no_network):
    from ftcourse import data, sft

    tokenizer, model = profiles.load_tokenizer(), profiles.load_base()
    records = data.load_records("messages", "train", size=8)
    run = sft.lora_sft(model, tokenizer, records, steps=2, batch_size=4, progress=False)
    from huggingface_hub.utils import _telemetry

    _telemetry._TELEMETRY_QUEUE.join()  # TRL's ping is sent from a thread: wait until it is done, if any

    assert no_network == []  # TRL's telemetry ping and hub lookups are off on the cpu profile
    assert run.model is not model  # it trained a copy, offline


def test_run_sizes_take_the_minimal_entry_only_under_minimal_sizes(monkeypatch):
    table = {"cpu": {"steps": 20}, "spark": {"steps": 500}, "minimal": {"steps": 2}}
    assert profiles.run_sizes(table, profiles.active_profile({})) == {"steps": 20}
    spark_minimal = profiles.active_profile({"FTCOURSE_PROFILE": "spark", "FTCOURSE_SIZES": "minimal"})
    assert spark_minimal.minimal and spark_minimal.eval_per_family == 4
    assert profiles.run_sizes(table, spark_minimal) == {"steps": 2}
    # A table without a minimal entry falls back to the profile's own; one without either names the gap.
    assert profiles.run_sizes({"spark": 7}, spark_minimal) == 7
    with pytest.raises(ValueError, match=r"no run sizes for profile 'spark'; this table knows \['cpu'\]"):
        profiles.run_sizes({"cpu": 1}, spark_minimal)


def test_note_skip_returns_its_line_and_logs_it_as_json(monkeypatch, tmp_path):
    import json

    log = tmp_path / "skips.jsonl"
    monkeypatch.delenv(profiles.SKIP_LOG_ENV, raising=False)
    assert profiles.note_skip("the judge", "No server.") == "Skipped here: the judge. No server."
    assert not log.exists()
    monkeypatch.setenv(profiles.SKIP_LOG_ENV, str(log))
    profiles.note_skip("the judge", "No server.")
    profiles.note_skip("Unsloth", "Needs CUDA.")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["what"] for row in rows] == ["the judge", "Unsloth"] and rows[1]["why"] == "Needs CUDA."
