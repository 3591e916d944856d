"""Tests for ftcourse.llamacpp: quantizing with llama.cpp, agreement with transformers, serving, and
stopping cleanly on Ctrl-C."""

from __future__ import annotations

import math
import subprocess

import gguf
import pytest
from export_fixtures import *  # noqa: F403
from export_fixtures import F16_MAX_LOGIT_DIFF, Q8_0_MIN_ARGMAX_AGREEMENT

from ftcourse import gguf as ftgguf
from ftcourse import llamacpp


def _compare(export_hf, export_prompts, path) -> llamacpp.GGUFComparison:
    model, tokenizer = export_hf
    report = llamacpp.compare_with_llama_cpp(model, tokenizer, path, export_prompts, max_new_tokens=16)
    print(f"{report.summary()}; {path.stat().st_size} bytes")  # visible with pytest -s
    return report


def test_llama_cpp_is_installed():
    install = llamacpp.LLAMA_CPP_INSTALL
    assert llamacpp.llama_cpp_available(), f"llama-cpp-python is a test dependency: {install}"


def test_f16_gguf_gives_transformers_logits_and_greedy_tokens(export_hf, export_prompts, export_gguf_files):
    report = _compare(export_hf, export_prompts, export_gguf_files["f16"])

    assert report.max_abs_logit_diff < F16_MAX_LOGIT_DIFF
    assert report.argmax_agreement >= 0.98  # measured 1.0; only a near tie could flip
    # a near tie (top two logits closer than the tolerance allows) may flip; anything else may not
    divergences = [(p.first_divergence, p.gap_at_divergence) for p in report.prompts]
    assert report.greedy_equal_except_ties(tie_gap=2 * F16_MAX_LOGIT_DIFF), divergences
    assert llamacpp.check_comparison(report, llamacpp.check_tolerance("f16")) == []


def test_without_qk_permutation_llama_cpp_logits_differ(
    export_model_dir, export_hf, export_prompts, tmp_path
):
    broken = ftgguf.write_gguf(export_model_dir, tmp_path / "no-permute.gguf", "f16", permute=False)
    report = _compare(export_hf, export_prompts, broken)

    assert report.max_abs_logit_diff > 20 * F16_MAX_LOGIT_DIFF  # measured ~5 on the fixture model
    assert report.argmax_agreement < 1.0
    failures = llamacpp.check_comparison(report, llamacpp.check_tolerance("f16"))  # --check catches it
    assert failures and "max |dlogit|" in failures[0]


def test_q8_0_gguf_agrees_on_the_argmax(export_hf, export_prompts, export_gguf_files):
    report = _compare(export_hf, export_prompts, export_gguf_files["q8_0"])

    assert report.argmax_agreement >= Q8_0_MIN_ARGMAX_AGREEMENT
    assert report.max_abs_logit_diff < 1.0  # measured ~0.3
    assert export_gguf_files["q8_0"].stat().st_size < 0.6 * export_gguf_files["f16"].stat().st_size


def test_q4_k_m_uses_k_quants_and_stays_close(export_hf, export_prompts, export_gguf_files):
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(export_gguf_files["Q4_K_M"]).tensors}
    report = _compare(export_hf, export_prompts, export_gguf_files["Q4_K_M"])

    assert "Q4_K" in types.values(), types  # rows of 256 and 768 allow K-quants, no fallback
    assert export_gguf_files["Q4_K_M"].stat().st_size < export_gguf_files["q8_0"].stat().st_size
    assert report.argmax_agreement >= 0.7  # measured ~0.9; greedy output may diverge at 4 bits


def test_check_comparison_names_each_missed_tolerance():
    prompt = llamacpp.PromptComparison([1, 2], 0.2, 0.5, [3], [3], None, None)  # worked by hand
    report = llamacpp.GGUFComparison(gguf_path=__import__("pathlib").Path("x.gguf"), prompts=[prompt])

    assert llamacpp.check_comparison(report, llamacpp.Tolerance(0.1, 0.9)) == [
        "max |dlogit| 0.2 >= 0.1",
        "argmax agreement 50.0% < 90% (near ties under 0.2 apart counted as agreed; plain 50.0%)",
    ]
    assert llamacpp.check_comparison(report, llamacpp.Tolerance(None, 0.5)) == []
    assert llamacpp.check_tolerance("Q4_K_M") == llamacpp.CHECK_TOLERANCES["Q4"]


def test_an_argmax_flip_at_a_near_tie_is_within_a_logit_bound():
    # Two positions, one miss. Bound 0.1: every logit within 0.1, so a flip is possible only where the two
    # candidates were under 0.2 apart. A miss 0.05 apart is rounding (agreement 100%); 0.5 apart is not.
    def report(gap: float) -> llamacpp.GGUFComparison:
        prompt = llamacpp.PromptComparison([1, 2], 0.04, 0.5, [3], [3], None, None, argmax_miss_gaps=(gap,))
        return llamacpp.GGUFComparison(gguf_path=__import__("pathlib").Path("x.gguf"), prompts=[prompt])

    assert report(0.05).argmax_agreement_except_ties(0.2) == 1.0
    assert llamacpp.check_comparison(report(0.05), llamacpp.Tolerance(0.1, 0.9)) == []
    assert llamacpp.check_comparison(report(0.5), llamacpp.Tolerance(0.1, 0.9)) == [
        "argmax agreement 50.0% < 90% (near ties under 0.2 apart counted as agreed; plain 50.0%)"
    ]
    # no logit bound (k-quants): no tie rule, the plain agreement is judged
    assert llamacpp.check_comparison(report(0.05), llamacpp.Tolerance(None, 0.9)) == [
        "argmax agreement 50.0% < 90%"
    ]


# --- Options are checked before any work ---------------------------------------------------------


@pytest.mark.parametrize(
    ("quant", "match"),
    [("Q4_K_X", "Unknown GGUF type 'Q4_K_X'"), ("IQ2_XS", "importance matrix"), ("", "must be a name")],
)
def test_unknown_or_unsupported_quant_is_refused_before_work(quant, match, tmp_path):
    with pytest.raises(ftgguf.ExportError, match=match):
        llamacpp.quantize_gguf(tmp_path / "missing-f16.gguf", tmp_path / "out.gguf", quant)
    assert llamacpp.check_quant_type("q4_k_m") == "Q4_K_M" and llamacpp.check_quant_type("F16") == "f16"


def test_llama_cpp_quantizer_also_writes_q8_0(export_gguf_files, tmp_path):
    path = llamacpp.quantize_gguf(
        export_gguf_files["f16"], tmp_path / "q8.gguf", "Q8_0"
    )  # the exercise's call
    assert "Q8_0" in ftgguf.gguf_stats(path).weights_per_type


def test_damaged_f16_file_is_named_before_quantizing(tmp_path):
    bad = tmp_path / "model-f16.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # a GGUF magic and nothing usable

    with pytest.raises(ftgguf.ExportError, match=r"model-f16\.gguf is not a readable GGUF file"):
        llamacpp.quantize_gguf(bad, tmp_path / "out.gguf", "Q4_K_M")
    assert [p.name for p in tmp_path.iterdir()] == ["model-f16.gguf"]


def test_quantizer_failure_quotes_llama_cpp_log(export_gguf_files, tmp_path, monkeypatch):
    failing = "import sys; print('llama_model_quantize: failed to quantize: out of disk'); sys.exit(1)"
    monkeypatch.setattr(llamacpp, "_QUANTIZE_CHILD", failing)  # llama.cpp failing, as its log says

    with pytest.raises(ftgguf.ExportError, match=r"exit status 1\)\. Its log ends:\n.*out of disk"):
        llamacpp.quantize_gguf(export_gguf_files["f16"], tmp_path / "out.gguf", "Q4_K_M")
    assert list(tmp_path.iterdir()) == []


def test_damaged_gguf_does_not_load_with_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ftgguf.ExportError, match="llama.cpp cannot load"):
        llamacpp.open_llama(bad)


# --- Ctrl-C -------------------------------------------------------------------------------------


def test_ctrl_c_during_quantization_stops_llama_cpp_and_leaves_no_file(
    export_gguf_files, tmp_path, monkeypatch
):
    children = []
    original_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        children.append(original_popen(*args, **kwargs))
        return children[-1]

    def ctrl_c():  # what Python raises in the waiting main thread when the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    out = tmp_path / "model-Q4_K_M.gguf"
    with pytest.raises(KeyboardInterrupt):
        llamacpp.quantize_gguf(export_gguf_files["f16"], out, "Q4_K_M", on_wait=ctrl_c)

    assert len(children) == 1 and children[0].poll() is not None  # llama.cpp's process is gone
    assert children[0].returncode != 0  # killed, not finished
    assert list(tmp_path.iterdir()) == []  # no partial file, no finished file


def test_a_real_sigint_while_quantizing_stops_the_run(export_gguf_files, tmp_path):
    import os
    import signal

    def press_ctrl_c():  # the signal itself, delivered to this process while llama.cpp works
        os.kill(os.getpid(), signal.SIGINT)

    # A shell starts background jobs with SIGINT ignored, and Python then installs no handler: put
    # Python's own in place, so the signal raises KeyboardInterrupt however the test run was started.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            llamacpp.quantize_gguf(
                export_gguf_files["f16"], tmp_path / "q4.gguf", "Q4_K_M", on_wait=press_ctrl_c
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []


# --- Serving with llama.cpp alone ----------------------------------------------------------------


def test_llama_cpp_adds_no_bos_because_the_file_says_so(export_gguf_files):
    llm = llamacpp.open_llama(export_gguf_files["f16"], vocab_only=True)
    try:
        # add_bos=True asks for the model's BOS *if* its add_bos_token flag is true; ours is false
        assert llm.tokenize(b"Hello", add_bos=True) == llm.tokenize(b"Hello", add_bos=False)
    finally:
        llm.close()


def test_llama_cpp_completion_is_the_greedy_continuation(export_hf, export_prompts, export_gguf_files):
    model, tokenizer = export_hf
    path = export_gguf_files["f16"]
    report = llamacpp.compare_with_llama_cpp(model, tokenizer, path, export_prompts, max_new_tokens=8)
    replies = llamacpp.generate_with_llama_cpp(path, export_prompts, max_new_tokens=8)

    for compared, reply in zip(report.prompts, replies, strict=True):
        tokens = compared.gguf_tokens  # llama.cpp's own greedy tokens, from the logits
        if tokenizer.eos_token_id in tokens:  # the completion stops at EOS and leaves it out
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        assert reply == tokenizer.decode(tokens, skip_special_tokens=False)


def test_exact_match_with_llama_cpp_scores_llama_cpp_replies(export_hf, export_gguf_files):
    from ftcourse import evaluate
    from ftcourse.toy.tasks import build_tasks

    tokenizer = export_hf[1]
    tasks = build_tasks("test", per_family=2)
    report = llamacpp.exact_match_with_llama_cpp(export_gguf_files["q8_0"], tokenizer, tasks)
    prompts = [evaluate.chat_prompt(tokenizer, task) for task in tasks]
    replies = llamacpp.generate_with_llama_cpp(export_gguf_files["q8_0"], prompts)

    assert report.n_tasks == len(tasks) and set(report.by_family) == {t.family for t in tasks}
    assert report.replies == tuple(evaluate.first_answer(r) for r in replies)
    hits = [answer == task.answer for answer, task in zip(report.replies, tasks, strict=True)]
    assert report.overall == sum(hits) / len(tasks)


# --- Held-out sets served by llama.cpp ------------------------------------------------------------


def _chat_heldout(rows):
    from ftcourse import heldout

    return heldout.HeldOut("hub/chat", "test", "messages", tuple(rows))


CHAT_ROWS = (
    {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Which number is the largest: 4 9 1"},
            {"role": "assistant", "content": "9"},
            {"role": "user", "content": "And the smallest?"},
            {"role": "assistant", "content": "1"},
        ],
        "category": "Chat",
    },
)


def test_heldout_prompts_are_the_turns_before_the_reference_reply(export_hf):
    from ftcourse import evaluate, heldout

    tokenizer = export_hf[1]
    tasks = heldout.capability_tasks(1)
    by_task = [evaluate.chat_prompt(tokenizer, t) for t in tasks.rows]
    assert llamacpp.heldout_prompts(tokenizer, tasks) == by_task
    prompts = llamacpp.heldout_prompts(tokenizer, _chat_heldout(CHAT_ROWS))
    last = CHAT_ROWS[1]["messages"]
    assert prompts[1] == tokenizer.apply_chat_template(last[:-1], tokenize=False, add_generation_prompt=True)
    assert "And the smallest?" in prompts[1] and not prompts[1].rstrip().endswith("1")
    with pytest.raises(ValueError, match="'tasks' or 'messages'"):
        llamacpp.heldout_prompts(tokenizer, heldout.HeldOut("x", "test", "preference", ()))


def test_llama_cpp_reply_logprobs_match_transformers_through_an_f16_file(export_hf, export_gguf_files):
    from ftcourse import heldout

    model, tokenizer = export_hf
    by_llama_cpp = llamacpp.reply_logprobs_with_llama_cpp(export_gguf_files["f16"], tokenizer, CHAT_ROWS)
    by_transformers = heldout.row_scores(model, tokenizer, CHAT_ROWS, "messages")
    assert by_llama_cpp == pytest.approx(by_transformers, abs=0.02)  # f16 weights and activations


def test_score_with_llama_cpp_is_heldout_score_served(export_hf, export_gguf_files, tmp_path, monkeypatch):
    import json

    from ftcourse import evaluate, heldout, profiles

    model, tokenizer = export_hf
    path = export_gguf_files["f16"]
    log = tmp_path / "sources.jsonl"
    monkeypatch.setenv(profiles.SOURCE_LOG_ENV, str(log))
    report = llamacpp.score_with_llama_cpp(path, tokenizer, _chat_heldout(CHAT_ROWS))
    reference = heldout.score(model, tokenizer, _chat_heldout(CHAT_ROWS))

    assert isinstance(report, heldout.ReplyReport) and report.measure == reference.measure
    assert report.families == ("messages", "Chat") and report.clusters() == reference.clusters()
    assert report.hits == pytest.approx(reference.hits, abs=0.02)
    prompts = llamacpp.heldout_prompts(tokenizer, _chat_heldout(CHAT_ROWS))
    replies = llamacpp.generate_with_llama_cpp(path, prompts)
    assert report.replies == tuple(evaluate.first_answer(r) for r in replies)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"use": "score", "source": "hub/chat", "what": reference.measure} in entries
    with pytest.raises(ValueError, match="prefix_ids and max_new_tokens"):
        llamacpp.score_with_llama_cpp(path, tokenizer, _chat_heldout(CHAT_ROWS), form="raw")
    tasks = heldout.capability_tasks(1)  # on tasks: exact match of llama.cpp's replies, as before
    assert llamacpp.score_with_llama_cpp(path, tokenizer, tasks) == llamacpp.exact_match_with_llama_cpp(
        path, tokenizer, list(tasks.rows)
    )


def test_a_prefix_token_moves_the_served_reply_likelihood(export_hf, export_gguf_files):
    tokenizer = export_hf[1]
    path = export_gguf_files["f16"]
    plain = llamacpp.reply_logprobs_with_llama_cpp(path, tokenizer, CHAT_ROWS[:1])
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    prefixed = llamacpp.reply_logprobs_with_llama_cpp(path, tokenizer, CHAT_ROWS[:1], prefix_ids=[eot])
    assert prefixed[0] != plain[0]  # the reply's positions shift, and so does what the model reads first


def test_transformers_replies_are_exact_matchs_replies_on_tasks(export_hf):
    from ftcourse import evaluate, heldout

    model, tokenizer = export_hf
    tasks = heldout.capability_tasks(1)
    assert (
        tuple(llamacpp.transformers_replies(model, tokenizer, tasks))
        == evaluate.exact_match(model, tokenizer, list(tasks.rows)).replies
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_fail_the_check(bad):
    # nan >= bound is False: without an explicit test a NaN logit difference passed every tolerance.
    prompt = llamacpp.PromptComparison([1, 2], bad, 1.0, [3], [3], None, None)
    report = llamacpp.GGUFComparison(gguf_path=__import__("pathlib").Path("x.gguf"), prompts=[prompt])

    for quant in ("f16", "q8_0", "Q4_K_M"):
        assert llamacpp.check_comparison(report, llamacpp.check_tolerance(quant)), quant
    prompt.max_abs_logit_diff, prompt.argmax_agreement = 0.0, float("nan")
    assert llamacpp.check_comparison(report, llamacpp.check_tolerance("Q4_K_M"))


def test_quantization_ladder_measures_each_rung_against_f16(
    export_hf, export_prompts, export_gguf_files, tmp_path
):
    tokenizer = export_hf[1]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in export_prompts]
    types = ("f16", "Q8_0", "Q2_K")
    rungs = llamacpp.quantization_ladder(export_gguf_files["f16"], tmp_path, ids, ids[:2], types)

    assert [r.quant for r in rungs] == ["f16", "Q8_0", "Q2_K"]
    assert rungs[0].greedy_agreement == 1.0 and rungs[0].path == export_gguf_files["f16"]
    assert rungs[0].file_bytes > rungs[1].file_bytes > rungs[2].file_bytes
    assert all(math.isfinite(r.perplexity) and r.perplexity > 1.0 for r in rungs)


def test_perplexity_is_the_exponent_of_the_mean_token_loss(export_hf, export_gguf_files):
    import numpy as np
    import torch

    model, tokenizer = export_hf
    ids = tokenizer("Once upon a time, there was a river.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    ppl = llamacpp.perplexity_with_llama_cpp(export_gguf_files["f16"], [ids])
    assert abs(np.log(ppl) - loss) < 0.01  # transformers' mean cross-entropy, through an f16 file


def test_serving_gb_counts_weights_and_the_kv_cache():
    from ftcourse.memory import architecture

    arch = architecture("llama-3.1-8b")
    need = llamacpp.serving_gb("llama-3.1-8b", 16, 1000)
    assert need["weights"] == arch.total_params() * 2 / 1e9
    assert need["kv_cache"] == 2 * 32 * 8 * 128 * 1000 * 2 / 1e9  # K and V, 32 layers, 8 KV heads of 128
    assert need["total"] == need["weights"] + need["kv_cache"]
