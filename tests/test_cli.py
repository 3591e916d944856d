"""Tests for ftcourse.cli: exit status on every failure, --check that can fail, and Ctrl-C."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from export_fixtures import *  # noqa: F403
from export_fixtures import save_adapter

from ftcourse import cli, gguf, llamacpp
from ftcourse.cli import main as cli_main


@pytest.fixture
def closed_ollama_port(monkeypatch) -> str:
    """OLLAMA_HOST pointing at a local port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    return f"127.0.0.1:{port}"


def test_cli_exports_an_adapter_and_checks_every_file(export_model_dir, tmp_path, closed_ollama_port, capsys):
    adapter = save_adapter(export_model_dir, tmp_path / "adapter")
    out = tmp_path / "export"
    argv = ["export", str(adapter), str(out), "--base", str(export_model_dir), "--no-progress", "--check"]

    status = cli_main([*argv, "--ollama-name", "ftcourse-test"])

    printed = capsys.readouterr().out
    assert status == 1 and "No Ollama server" in printed  # every file is written; only registration failed
    assert {p.name for p in out.iterdir()} >= {"hf", "model-f16.gguf", "model-q8_0.gguf", "model-Q4_K_M.gguf"}
    assert printed.count("PASS ") == 3 and "FAIL" not in printed
    assert cli_main(argv) == 0  # without the registration, everything succeeds


def test_check_exits_non_zero_when_a_file_misses_its_tolerance(
    export_model_dir, tmp_path, capsys, monkeypatch
):
    original = gguf.write_gguf

    def without_permutation(*args, **kwargs):  # a converter bug: fluent text, wrong logits
        return original(*args, **{**kwargs, "permute": False})

    monkeypatch.setattr("ftcourse.export.write_gguf", without_permutation)
    argv = ["export", str(export_model_dir), str(tmp_path / "out"), "--quant", "f16", "--no-progress"]

    assert cli_main(argv) == 0  # the file is written and loads ...
    assert cli_main([*argv, "--check"]) == 1  # ... but --check catches it
    assert "FAIL (max |dlogit|" in capsys.readouterr().out


def test_ctrl_c_during_quantization_exits_130_and_keeps_the_folder(
    export_model_dir, tmp_path, monkeypatch, capsys
):
    original = llamacpp.quantize_gguf

    def ctrl_c_while_waiting(*args, **kwargs):
        def interrupt():
            raise KeyboardInterrupt

        return original(*args, **{**kwargs, "on_wait": interrupt})

    monkeypatch.setattr(llamacpp, "quantize_gguf", ctrl_c_while_waiting)
    out = tmp_path / "out"

    assert cli_main(["export", str(export_model_dir), str(out), "--no-progress"]) == cli.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no folder, no partial file


def test_cli_reports_bad_input_with_status_1(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path), str(tmp_path / "out"), "--quant", "IQ1_S"]) == 1
    assert "importance matrix" in capsys.readouterr().err


def test_help_states_the_check_tolerances():
    text = cli.build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    for quant, tolerance in llamacpp.CHECK_TOLERANCES.items():
        assert f"{quant}: {tolerance.describe()}" in " ".join(text.split())


def test_cli_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "ftcourse.cli", "export", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])},
    )
    assert result.returncode == 0 and "--ollama-name" in result.stdout


def test_check_fails_a_file_that_does_not_load(export_model_dir, tmp_path, capsys):
    bad = tmp_path / "model-f16.gguf"
    bad.write_bytes(b"GGUF but not really")

    assert cli.check_files(export_model_dir, {"f16": bad}) is False
    assert "FAIL model-f16.gguf: does not load" in capsys.readouterr().out
