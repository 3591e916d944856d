"""ftcourse.machine (reference workload, speed factor) and the scaled chapter budgets of conftest.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from test_book import _root_conftest

from ftcourse import machine


def test_speed_factor_is_the_weighted_geometric_mean_of_the_parts_ratios():
    design = {"a": 1.0, "b": 2.0, "c": 4.0}
    equal = {"a": 1.0, "b": 1.0, "c": 1.0}
    # ratios 2, 0.5 and 4: geometric mean (2 * 0.5 * 4) ** (1/3) = 4 ** (1/3), worked by hand
    factor = machine.speed_factor({"a": 2.0, "b": 1.0, "c": 16.0}, design, equal)
    assert factor == pytest.approx(4 ** (1 / 3), rel=1e-12)
    # weights 0.5, 0.25, 0.25 on ratios 2, 1, 4: 2 ** 0.5 * 4 ** 0.25 = 2
    weighted = machine.speed_factor({"a": 2.0, "b": 2.0, "c": 16.0}, design, {"a": 0.5, "b": 0.25, "c": 0.25})
    assert weighted == pytest.approx(2.0, rel=1e-12)
    assert machine.speed_factor(dict(design), design, equal) == pytest.approx(1.0, rel=1e-12)


def test_a_slow_bfloat16_part_moves_the_book_factor_by_its_weight_only():
    slow_bf16 = dict(machine.DESIGN_SECONDS)
    slow_bf16["bfloat16 matmul"] *= 100
    expected = 100 ** (machine.PART_WEIGHTS["bfloat16 matmul"] / sum(machine.PART_WEIGHTS.values()))
    assert machine.speed_factor(slow_bf16) == pytest.approx(expected, rel=1e-12)


def test_speed_factor_is_bounded_and_rejects_a_zero_time():
    design, weights = {"a": 1.0}, {"a": 1.0}
    assert machine.speed_factor({"a": 1000.0}, design, weights) == machine.FACTOR_BOUNDS[1]
    assert machine.speed_factor({"a": 1e-6}, design, weights) == machine.FACTOR_BOUNDS[0]
    with pytest.raises(ValueError, match="positive"):
        machine.speed_factor({"a": 0.0}, design, weights)


def test_cpu_description_names_the_model_and_a_forced_capability(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    text = machine.cpu_description()
    assert machine.cpu_model() in text
    assert "ATEN_CPU_CAPABILITY=avx2" in text
    flags = machine.cpu_flags()
    for flag in machine.KERNEL_FLAGS:
        if flag in flags:
            assert flag in text


def test_reference_workload_parts_match_the_design_table():
    seconds = machine.reference_workload(repeats=1)
    assert set(seconds) == set(machine.DESIGN_SECONDS)
    assert all(value > 0 for value in seconds.values())


def test_module_prints_one_json_object_the_test_run_reads():
    done = subprocess.run(
        [sys.executable, "-m", "ftcourse.machine"], capture_output=True, text=True, check=True
    )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(data) >= {"cpu", "seconds", "factor", "total_seconds", "design_cpu"}
    assert data["total_seconds"] == pytest.approx(sum(data["seconds"].values()), rel=1e-9)
    lo, hi = machine.FACTOR_BOUNDS
    assert lo <= data["factor"] <= hi


def test_scaled_budget_and_verdicts():
    conftest = _root_conftest()
    speed = conftest.MachineSpeed(cpu="x", seconds={}, factor=2.0)
    assert speed.budget(90) == 180
    assert speed.fail_limit(90) == conftest.BUDGET_FAIL_FACTOR * 180
    verdict = conftest.chapter_verdict
    assert verdict(170, True, speed) == "ok"
    assert verdict(190, True, speed) == "OVER BUDGET"
    assert verdict(speed.fail_limit() + 1, True, speed) == "TOO SLOW"
    assert verdict(1, False, speed) == "FAILED"


def test_forced_factor_skips_the_measurement():
    conftest = _root_conftest()
    speed = conftest.measure_speed({conftest.SPEED_FACTOR_ENV: "1.5"})
    assert speed.factor == 1.5 and not speed.seconds and "1.5" in speed.note


def test_design_seconds_are_positive_and_finite():
    assert all(value > 0 and math.isfinite(value) for value in machine.DESIGN_SECONDS.values())
