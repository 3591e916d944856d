"""Tests for ftcourse.distributed: accelerate config files, the launch command, one offline process."""

from __future__ import annotations

import json
import socket
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


@pytest.fixture(scope="module")
def single_record(tmp_path_factory):
    """Two LoRA steps in this process, batch 4: the reference the FSDP run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "result.json"
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:3]))
        raise OSError("network access during a cpu-profile run")

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RANK", raising=False)
        patch.setenv("WORLD_SIZE", "1")
        for name in ("connect", "connect_ex"):
            patch.setattr(socket.socket, name, refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        record = distributed.train_process(steps=2, per_device_batch=4, strategy="single", out=out)
    assert attempts == []
    return record, out


def test_train_process_single_runs_offline_and_writes_rank0_record(single_record):
    record, out = single_record
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(record))
    assert record["world_size"] == 1 and record["global_batch"] == 4
    assert [step for step, _ in record["losses"]] == [1, 2]
    assert record["distributed_type"] == "NO"  # one process: accelerate runs no distributed engine
    assert record["parameter_types"] == ["Parameter"]
    assert record["parameter_bytes_per_rank"] == [record["parameter_bytes_full"]]


def test_fsdp_on_two_cpu_processes_shards_and_matches_one_process(single_record, monkeypatch):
    """2 processes over gloo, FSDP2 via accelerate: DTensor shards, half the bytes each, the same losses."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single, _ = single_record
    fsdp = distributed.run("fsdp", steps=2, global_batch=4)
    assert (fsdp["distributed_type"], fsdp["world_size"], fsdp["per_device_batch"]) == ("FSDP", 2, 2)
    assert fsdp["parameter_types"] == ["DTensor"]
    per_rank, full = fsdp["parameter_bytes_per_rank"], fsdp["parameter_bytes_full"]
    assert full == single["parameter_bytes_full"] and sum(per_rank) == full
    assert max(per_rank) <= 0.55 * full  # each process holds about half, not a full copy
    # Same examples, globally normalised loss: only the order of float32 additions differs.
    assert [s for s, _ in fsdp["losses"]] == [1, 2]
    for (_, ours), (_, reference) in zip(fsdp["losses"], single["losses"], strict=True):
        assert ours == pytest.approx(reference, abs=1e-4)


def test_parameter_bytes_by_hand():
    import torch

    model = torch.nn.Linear(3, 2)  # 6 weights + 2 biases, float32
    assert distributed.parameter_bytes(model) == {"local": 32, "full": 32}
    assert distributed.parameter_bytes(model.to(torch.bfloat16)) == {"local": 16, "full": 16}


def test_every_launch_config_exists():
    assert set(distributed.LAUNCH_CONFIGS.values()) <= set(distributed.CONFIGS)
    assert distributed.CONFIGS["multi-gpu-ddp"]["distributed_type"] == "MULTI_GPU"
    assert distributed.CONFIGS["cpu-fsdp"]["fsdp_config"]["fsdp_version"] == 2


def test_minimal_sizes_split_over_two_processes():
    from dataclasses import replace

    from ftcourse import profiles

    minimal = replace(profiles.PROFILES["spark"], minimal=True)
    sizes = profiles.run_sizes(distributed.RUN_SIZES, minimal)
    assert sizes == distributed.RUN_SIZES["minimal"] and sizes["global_batch"] % 2 == 0
    assert set(distributed.RUN_SIZES["minimal"]) == set(distributed.RUN_SIZES["cpu"])
