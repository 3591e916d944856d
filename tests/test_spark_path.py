"""The spark profile's code path, run offline on a CPU with the stand-ins of ftcourse.toy.standin.

The spark profile (Llama 3.1 from the hub, hub datasets, bf16, an Ollama judge) cannot be downloaded here.
These tests point it at a Llama-3.1-shaped stand-in and hub-shaped datasets and run what the chapters
run on a Spark, at minimal sizes: loading in bf16, the hub column layouts, SFT steps, exact match, the
GGUF export and llama.cpp. What cannot run on a CPU is skipped with its reason.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from ftcourse import data, evaluate, export, forgetting, llamacpp, profiles, sft
from ftcourse.toy import standin
from ftcourse.toy.tasks import FAMILIES, build_tasks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def spark_standin():
    """The spark profile, pointed at the stand-ins, for every test in this module."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in standin.standin_environment().items():
            patch.setenv(key, value)
        yield profiles.active_profile()


@pytest.fixture(scope="module")
def base(spark_standin):
    return profiles.load_base(), profiles.load_tokenizer()


@pytest.fixture(scope="module")
def sft_run(base):
    model, tokenizer = base
    records = data.load_records("messages", "train", size=8)
    return sft.train_sft(
        model, tokenizer, records, peft_config=sft.lora_config(), steps=2, batch_size=4, logging_steps=1,
        progress=False,
    )  # fmt: skip


def test_spark_profile_loads_the_standin_in_bf16(spark_standin, base):
    model, tokenizer = base
    assert spark_standin.name == "spark" and spark_standin.device == "cpu"  # FTCOURSE_DEVICE=cpu
    assert profiles.resolve_model("qlora") == profiles.resolve_model("lora")  # FTCOURSE_MODEL: both roles
    assert model.dtype == torch.bfloat16 and model.config.rope_parameters["rope_type"] == "llama3"
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.pad_token is None
    assert "spark" in profiles.describe()


def test_hub_schema_loaders_give_every_profile_the_same_columns(spark_standin):
    for schema, columns in data.SCHEMAS.items():
        for split in ("train", "test") if schema != "alpaca" else ("train",):
            records = data.load_records(schema, split, size=8)
            assert records.column_names == list(columns) and len(records) == 8, (schema, split)
    # ultrafeedback has an implicit prompt; load_records splits it off as the cpu profile's records have it
    pair = data.load_records("preference", "test", size=1)[0]
    assert [m["role"] for m in pair["prompt"]] == ["user"] and pair["chosen"][0]["role"] == "assistant"
    with pytest.raises(ValueError, match="has 64 rows, fewer than size=65"):
        data.load_records("alpaca", "train", size=65)


def test_perplexity_and_replay_text_come_from_the_wikitext_layout(spark_standin):
    held_out = evaluate.heldout_texts(3)
    replay = forgetting.replay_texts(3)
    assert len(held_out) == 3 and len(replay) == 3
    assert all(len(text.split()) >= 20 for text in held_out + replay)  # headings and blank lines skipped
    assert not set(held_out) & set(replay)  # test split measured, train split replayed


def test_sft_steps_run_in_bf16_without_the_network(base, no_network):
    model, tokenizer = base
    records = data.load_records("messages", "train", size=4)
    run = sft.train_sft(
        model, tokenizer, records, peft_config=sft.lora_config(), steps=1, batch_size=4, logging_steps=1
    )

    assert no_network == []
    assert run.recipe["dtype"] == "bfloat16" and len(run.losses) == 1 and math.isfinite(run.losses[0][1])
    assert next(p for p in run.model.parameters() if not p.requires_grad).dtype == torch.bfloat16


def test_assistant_only_loss_uses_the_llama_3_template(base, sft_run):
    assert sft_run.recipe["assistant_only_loss"] and len(sft_run.losses) == 2
    assert all(math.isfinite(loss) for _, loss in sft_run.losses)


def test_exact_match_runs_with_a_tokenizer_without_pad_token(base, sft_run):
    tokenizer = profiles.load_tokenizer()  # fresh: TRL's SFTTrainer sets pad_token = eos on the one it gets
    tasks = build_tasks("test", 2)
    assert tokenizer.pad_token is None and base[1].pad_token == "<|eot_id|>"
    report = evaluate.exact_match(sft_run.model, tokenizer, tasks, max_new_tokens=4)

    assert report.n_tasks == 2 * len(FAMILIES) and set(report.by_family) == set(FAMILIES)
    assert tokenizer.pad_token is None  # generate borrowed EOS for padding and gave it back
    prompt = evaluate.chat_prompt(tokenizer, tasks[0])
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_packing_losses_need_no_pad_token(base):
    tokenizer = profiles.load_tokenizer()
    losses = sft.packing_losses(base[0], tokenizer, data.load_records("messages", "train", size=2))
    assert tokenizer.pad_token is None and losses and all(math.isfinite(v) for v in losses.values())


def test_export_of_the_trained_model_agrees_with_llama_cpp(base, sft_run, tmp_path):
    tokenizer = base[1]
    result = export.export_pipeline(
        sft_run.model, tmp_path / "out", ["f16"], tokenizer=tokenizer, progress=False
    )
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32)
    prompts = [evaluate.chat_prompt(tokenizer, task) for task in build_tasks("test", 1)]
    report = llamacpp.compare_with_llama_cpp(
        merged, tokenizer, result.gguf_files["f16"], prompts, max_new_tokens=8
    )

    assert llamacpp.check_comparison(report, llamacpp.check_tolerance("f16")) == []
    modelfile = result.modelfile.read_text()
    assert (
        "<|start_header_id|>assistant<|end_header_id|>" in modelfile
        and 'PARAMETER stop "<|eot_id|>"' in modelfile
    )


def test_qlora_loads_the_spark_model_in_4_bit_and_trains_a_step(base, no_network):
    from ftcourse import qlora

    model = qlora.load_qlora_model()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    records = data.load_records("messages", "train", size=2)
    run = qlora.train_qlora(
        model, profiles.load_tokenizer(), records, steps=1, gradient_accumulation_steps=1, logging_steps=1,
    )  # fmt: skip
    assert no_network == [] and len(run.losses) == 1 and math.isfinite(run.losses[0][1])


def test_ollama_judge_needs_a_server(spark_standin):
    from ftcourse import ollama

    assert spark_standin.judge.startswith("ollama:")
    status = ollama.ollama_available(timeout=0.5)
    if not status:
        pytest.skip(
            f"spark judge {spark_standin.judge!r} needs an Ollama server with that model: {status.reason}"
        )
    assert evaluate.ollama_judge(spark_standin.judge.removeprefix("ollama:")) is not None  # needs the model


# --- the chapter runner under the stand-ins (conftest.py) -------------------------------------------------

SKIPPING_CELL = """import os

from ftcourse import profiles

print(profiles.note_skip("the fused kernel", "It needs CUDA."))
print("log:", os.path.basename(os.environ["FTCOURSE_SKIP_LOG"]))
"""


def test_chapter_runner_gives_each_chapter_a_skip_log_and_lists_the_skips(spark_standin, tmp_path):
    """A throwaway book with one chapter, run by a copy of conftest.py under the stand-ins' environment."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_book import run_throwaway_chapter

    env = {key: value for key, value in os.environ.items() if key != "FTCOURSE_EXECUTION_CACHE"}
    env.pop(profiles.SKIP_LOG_ENV, None)
    done = run_throwaway_chapter(tmp_path, "cuda", "A chapter with a CUDA-only step", SKIPPING_CELL, env)

    assert done.returncode == 0, done.stdout[-3000:]
    summary = done.stdout.split("spark stand-in skips")[-1]
    assert "spark stand-in skips" in done.stdout
    assert "book/cuda.md: the fused kernel. It needs CUDA." in summary
    assert "1 skip(s) in 1 of 1 chapter(s)" in summary
    assert not (tmp_path / "_build").exists()  # stand-in outputs never enter the book's execution cache


def test_chapter_runner_reads_skip_logs_that_are_not_json_as_skips(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_book import _root_conftest

    conftest = _root_conftest()
    assert conftest.SKIP_LOG_ENV == profiles.SKIP_LOG_ENV
    log = tmp_path / "chapter.jsonl"
    assert conftest.read_skip_log(log) == []  # a chapter that skipped nothing writes no file
    log.write_text('{"what": "Unsloth", "why": "Needs CUDA."}\n\nnot json\n')
    skips = conftest.read_skip_log(log)
    assert skips[0] == {"what": "Unsloth", "why": "Needs CUDA."} and len(skips) == 2
    assert skips[1]["what"] == "line 3 of chapter.jsonl is not a note_skip record"
    lines = conftest.skip_summary_lines({"a.md": skips, "b.md": []}, [("t::x", "no server")])
    assert lines[0] == "a.md: Unsloth. Needs CUDA." and lines[2] == "t::x (unit test): no server"
    assert lines[-1] == "2 skip(s) in 1 of 2 chapter(s); 1 unit test(s) skipped"
    assert conftest.standins_active({"FTCOURSE_PROFILE": "spark", "FTCOURSE_SIZES": "minimal"})
    assert not conftest.standins_active({"FTCOURSE_PROFILE": "spark"})  # real sizes: a run for the book
    assert conftest.minimal_sizes({"FTCOURSE_SIZES": "minimal"}) and not conftest.minimal_sizes({})


# --- held-out sets: the spark profile scores the test split of what it trains on (ftcourse.heldout) ------


def test_heldout_set_is_the_test_split_of_the_hub_dataset_the_chapters_train_on(base):
    from ftcourse import heldout

    model, tokenizer = base
    held = heldout.heldout_set("messages", per_family=2)
    assert held.source == "HuggingFaceH4/no_robots" == profiles.training_source("messages")
    assert held.schema == "messages" and held.split == "test" and len(held) == 8
    test_rows = list(data.load_records("messages", "test", size=8))
    assert [r["messages"] for r in held.rows] == [r["messages"] for r in test_rows]
    assert {r["category"] for r in held.rows} <= {"Chat", "Open QA", "Closed QA"}  # the stand-in's labels
    report = heldout.score(model, tokenizer, held)
    assert isinstance(report, heldout.ReplyReport) and report.n_tasks == 8
    assert all(math.isfinite(v) and v < 0 for v in report.hits)  # mean log-probabilities per token
    assert report.measure == heldout.SCORE_WORDS["messages"]
    with pytest.raises(ValueError, match="apply to exact match on tasks"):
        heldout.score(model, tokenizer, held, form="raw")
    pairs = heldout.heldout_set("preference", per_family=1)
    assert pairs.source == "trl-lib/ultrafeedback_binarized" and len(pairs) == 4
