"""Tests for ftcourse.distributed: accelerate config files, the launch command, one offline process."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from ftcourse import distributed


@pytest.mark.parametrize("name", sorted(distributed.CONFIGS))
def test_config_yaml_round_trips_and_is_consistent(name, tmp_path):
    path = distributed.write_config(name, tmp_path / f"{name}.yaml")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config == distributed.CONFIGS[name]
    assert config["num_processes"] % config["num_machines"] == 0
    if config["distributed_type"] == "FSDP":
        assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


def test_two_sparks_is_one_process_per_machine_on_two_machines():
    config = distributed.CONFIGS["two-sparks"]
    assert (config["num_machines"], config["num_processes"], config["mixed_precision"]) == (2, 2, "bf16")
    second = yaml.safe_load(distributed.config_yaml("two-sparks", machine_rank=1))
    assert second["machine_rank"] == 1 and distributed.CONFIGS["two-sparks"]["machine_rank"] == 0


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown name 'three-sparks'"):
        distributed.config_yaml("three-sparks")
    with pytest.raises(ValueError, match="no key"):
        distributed.config_yaml("cpu-ddp", num_gpus=2)


def test_launch_command_runs_this_module_under_accelerate(tmp_path):
    command = distributed.launch_command("cpu-ddp", tmp_path / "c.yaml", ["--steps", "2"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--config_file") + 1] == str(tmp_path / "c.yaml")
    assert command[-5:] == ["-m", "ftcourse.distributed", "train", "--steps", "2"]


def test_run_rejects_bad_arguments():
    with pytest.raises(ValueError, match="strategy must be one of"):
        distributed.run("zero3")
    with pytest.raises(ValueError, match="'fsdp' needs GPUs"):  # it would silently run as DDP on a CPU
        distributed.run("fsdp")
    with pytest.raises(ValueError, match="does not split evenly"):
        distributed.run("ddp", global_batch=15)


def test_loss_table_by_hand():
    records = {
        "single": {"losses": [[1, 2.0], [2, 1.5]]},
        "ddp": {"losses": [[1, 2.0], [2, 1.25]]},
        "fsdp": {"losses": [[1, 2.5], [2, 1.5]]},
    }
    rows = distributed.loss_table(records)
    assert [row["step"] for row in rows] == [1, 2]
    assert [row["max |Δ| vs single"] for row in rows] == [0.5, 0.25]


def test_train_process_single_runs_offline_and_writes_rank0_record(tmp_path, no_network, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "result.json"
    record = distributed.train_process(steps=2, per_device_batch=4, strategy="single", out=out)
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(record))
    assert record["world_size"] == 1 and record["global_batch"] == 4
    assert [step for step, _ in record["losses"]] == [1, 2]
    assert record["distributed_type"] == "NO"  # one process: accelerate runs no distributed engine
    assert no_network == []


def test_every_launch_config_exists():
    assert set(distributed.LAUNCH_CONFIGS.values()) <= set(distributed.CONFIGS)
    assert distributed.CONFIGS["multi-gpu-ddp"]["distributed_type"] == "MULTI_GPU"
