"""The `ftcourse train` command: one command from a data file to a model, then the export it prints."""

from __future__ import annotations

import shlex
from pathlib import Path

from ftcourse import cli, train

EXAMPLES = Path(__file__).resolve().parents[1] / "book" / "part3" / "your-data"


def test_train_then_the_printed_export_command_runs(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "lora", "--data", str(EXAMPLES / "sharegpt.jsonl"), "--out", str(out)]
    assert cli.main([*argv, "--steps", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "data report:" in printed and "fit-check: fits" in printed and "held-out score" in printed
    command = next(line for line in printed.splitlines() if line.startswith("next: ")).removeprefix("next: ")
    words = shlex.split(command)
    assert words[:2] == ["ftcourse", "export"]
    assert cli.main([*words[1:], "--quant", "q8_0", "--no-progress"]) == 0
    assert (out / "export" / "model-q8_0.gguf").is_file()


def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys):
    assert cli.main(["train", "simpo", "--data", str(EXAMPLES / "feedback.tsv"), "--out", str(tmp_path)]) == 2
    assert "ftcourse train: " in capsys.readouterr().err
    assert (
        cli.main(["train", "lora", "--data", str(EXAMPLES / "alpaca.json"), "--out", "x", "--steps", "0"])
        == 2
    )
    assert "steps must be a positive whole number" in capsys.readouterr().err
    assert cli.main(["train", "lora", "--data", "a.json", "--out", "x", "--columns", "oops"]) == 2
    assert "--columns takes NAME=VALUE" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    argv = ["train", "lora", "--data", str(EXAMPLES / "alpaca.json"), "--out", str(tmp_path)]
    assert cli.main(argv) == train.EXIT_INTERRUPTED
    assert "Run the same command again to resume" in capsys.readouterr().err
