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
    assert profiles.resolve_model(environ={"FTCOURSE_MODEL": str(tmp_path)}) == str(tmp_path)
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
