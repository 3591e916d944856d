"""The spark profile's code path, run offline on a CPU with the stand-ins of ftcourse.toy.standin.

The spark profile (Llama 3.1 from the hub, hub datasets, bf16, an Ollama judge) cannot be downloaded here.
These tests point it at a Llama-3.1-shaped stand-in and hub-shaped datasets and run what the chapters
run on a Spark, at minimal sizes: loading in bf16, the hub column layouts, SFT steps, exact match, the
GGUF export and llama.cpp. What cannot run on a CPU is skipped with its reason.
"""

from __future__ import annotations

import math

import pytest
import torch

from ftcourse import data, evaluate, export, forgetting, llamacpp, profiles, sft
from ftcourse.toy import standin
from ftcourse.toy.tasks import FAMILIES, build_tasks


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
        model, profiles.load_tokenizer(), records, steps=1, gradient_accumulation_steps=1, max_length=128,
        logging_steps=1,
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
