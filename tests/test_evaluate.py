"""ftcourse.evaluate: each metric computes what its docstring says, on inputs whose answer we know."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from itertools import product
from types import SimpleNamespace

import pytest
import torch

from ftcourse import evaluate, profiles
from ftcourse.data import task_records, to_alpaca, to_messages
from ftcourse.toy.corpus import ANSWER_GAPS
from ftcourse.toy.tasks import FAMILIES, build_tasks, raw_text


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return profiles.load_base()


# --- perplexity -------------------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_token_weighted_mean_nll_and_ignores_padding(model, tokenizer):
    # Two documents longer than max_length (truncated) and two short lines (padded in a shared batch).
    texts = evaluate.heldout_texts(2) + ["add: 3 + 4\n7", "max: 3 41 17\n41"]
    max_length = 64
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, truncation=True, max_length=max_length)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean NLL over the n-1 predicted tokens
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    by_hand = math.exp(total / count)
    one_by_one = evaluate.perplexity(model, tokenizer, texts, max_length=max_length, batch_size=1)
    padded = evaluate.perplexity(model, tokenizer, texts, max_length=max_length, batch_size=len(texts))
    # float32 sums over a few hundred tokens: 1e-4 relative is far tighter than any effect we report
    assert one_by_one == pytest.approx(by_hand, rel=1e-4)
    assert padded == pytest.approx(by_hand, rel=1e-4)


def test_nll_at_a_token_and_elsewhere_recombine_into_the_perplexity(model, tokenizer):
    texts = evaluate.heldout_texts(3)
    split = evaluate.nll_at_token(model, tokenizer, texts, "\n", max_length=64)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    targets = [t for ids in tokenizer(texts, truncation=True, max_length=64)["input_ids"] for t in ids[1:]]
    n_at = sum(t == newline for t in targets)
    assert 0 < n_at < len(targets)
    mean_nll = (split["at"] * n_at + split["elsewhere"] * (len(targets) - n_at)) / len(targets)
    assert math.exp(mean_nll) == pytest.approx(evaluate.perplexity(model, tokenizer, texts, 64), rel=1e-4)
    with pytest.raises(ValueError, match="single token"):
        evaluate.nll_at_token(model, tokenizer, texts, "capital city of")


def test_heldout_texts_are_not_pretraining_documents():
    training = set(evaluate.pretraining_texts())
    heldout = evaluate.heldout_texts(100, profiles.PROFILES["cpu"])
    assert len(heldout) == 100 and not training & set(heldout)


# --- exact match ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("dog cat<|im_end|>\n<|im_start|>user", "dog cat"),
        ("  19\nadd: 3 + 4", "19"),
        ("Varmal<|endoftext|>count:", "Varmal"),
        ("7<|eot_id|>", "7"),
        ("<|im_end|>", ""),
        ("no marker at all ", "no marker at all"),
    ],
)
def test_first_answer_cuts_at_the_first_end_of_turn_or_line_break(reply, answer):
    assert evaluate.first_answer(reply) == answer


class EchoTokenizer:
    """Just enough of a tokenizer for exact_match: the chat prompt is the user's text."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[-1]["content"]


def test_exact_match_of_a_model_with_known_replies(monkeypatch):
    tasks = build_tasks("test", per_family=4)
    right: set[str] = set()
    n_right_by_family = dict(zip(FAMILIES, (4, 3, 1, 0), strict=True))
    for family, n_right in n_right_by_family.items():
        right |= {t.prompt for t in [t for t in tasks if t.family == family][:n_right]}

    def fake_generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=32):
        by_prompt = {t.prompt: t for t in tasks}
        # right answers carry a stop marker and trailing junk, which first_answer must cut off
        return [f"{by_prompt[p].answer}<|im_end|>junk" if p in right else "wrong" for p in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    report = evaluate.exact_match(None, EchoTokenizer(), tasks)
    assert report.by_family == dict(zip(FAMILIES, (1.0, 0.75, 0.25, 0.0), strict=True))
    assert report.overall == 0.5 and report.n_tasks == 16 and sum(report.hits) == 8
    assert report.replies[0] == tasks[0].answer
    low, high = report.interval()
    assert low < 0.5 < high
    low, high = report.interval(FAMILIES[0])  # 4 of 4: Wilson's interval still has width
    assert high == 1.0 and low < 1.0
    assert report.with_intervals()["count"][0] == 0.25 and set(report.with_intervals()) == {
        *FAMILIES,
        "overall",
    }


def test_exact_match_refuses_empty_tasks_zero_batches_and_prompts_longer_than_the_context(model, tokenizer):
    tasks = build_tasks("test", 2)
    with pytest.raises(ValueError, match="at least one task"):
        evaluate.exact_match(model, tokenizer, [])
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        evaluate.exact_match(model, tokenizer, tasks, batch_size=0)
    with pytest.raises(ValueError, match="shots must be 0 or more"):
        evaluate.exact_match(model, tokenizer, tasks, shots=-1)
    context = model.config.max_position_embeddings
    prompts = [evaluate.chat_prompt(tokenizer, t) for t in tasks]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert evaluate.check_context(model, tokenizer, prompts, 16) == longest
    with pytest.raises(ValueError, match=rf"needs {longest + context} positions.*is {context}\b"):
        evaluate.check_context(model, tokenizer, prompts, max_new_tokens=context)
    with pytest.raises(ValueError, match="Use fewer than 60 shots"):  # 60 examples cannot fit in 512
        evaluate.exact_match(model, tokenizer, tasks, shots=60)


def test_score_replies_refuses_a_reply_count_that_does_not_match():
    with pytest.raises(ValueError, match="3 replies for 4 tasks"):
        evaluate.score_replies(["1", "2", "3"], build_tasks("test", 1))


# --- uncertainty ------------------------------------------------------------------------------------------

Z = 1.959963984540054


def wilson_by_hand(x: float, n: int, z: float = Z) -> tuple[float, float]:
    # The textbook form (x + z^2/2) / (n + z^2) +- z sqrt(n) / (n + z^2) sqrt(p q + z^2 / 4n).
    p = x / n
    centre = (x + z**2 / 2) / (n + z**2)
    half = z * math.sqrt(n) / (n + z**2) * math.sqrt(p * (1 - p) + z**2 / (4 * n))
    return centre - half, centre + half


def test_wilson_interval_at_0_and_100_percent_has_width_and_matches_the_closed_form():
    low, high = evaluate.wilson_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(Z**2 / (50 + Z**2), abs=1e-12)  # 0.0713: not a point
    low, high = evaluate.wilson_interval(50, 50)
    assert low == pytest.approx(50 / (50 + Z**2), abs=1e-12) and high == 1.0
    for x, n in ((7, 20), (1, 3), (33, 44)):
        assert evaluate.wilson_interval(x, n) == pytest.approx(wilson_by_hand(x, n), abs=1e-12)
        # Defining property: at each bound the z-test of the observed share is exactly on the edge.
        for bound in evaluate.wilson_interval(x, n):
            assert abs(x / n - bound) == pytest.approx(Z * math.sqrt(bound * (1 - bound) / n), abs=1e-12)
    assert evaluate.z_for(0.95) == pytest.approx(Z, abs=1e-9)
    with pytest.raises(ValueError, match="n > 0"):
        evaluate.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="between 0 and n=5"):
        evaluate.wilson_interval(6, 5)


def test_clopper_pearson_interval_has_its_closed_form_at_the_edges_and_exact_tails_inside():
    # 0 of n: the upper bound solves (1 - p)^n = alpha / 2; n of n: the lower bound solves p^n = alpha / 2.
    assert evaluate.clopper_pearson_interval(0, 50) == pytest.approx((0.0, 1 - 0.025 ** (1 / 50)), abs=1e-9)
    assert evaluate.clopper_pearson_interval(50, 50) == pytest.approx((0.025 ** (1 / 50), 1.0), abs=1e-9)
    low, high = evaluate.clopper_pearson_interval(7, 20)
    tail = lambda k, p: sum(math.comb(20, i) * p**i * (1 - p) ** (20 - i) for i in range(k + 1))  # noqa: E731
    assert 1 - tail(6, low) == pytest.approx(0.025, abs=1e-9) and tail(7, high) == pytest.approx(
        0.025, abs=1e-9
    )
    wilson = evaluate.wilson_interval(7, 20)
    assert low < wilson[0] and wilson[1] < high  # the exact interval is the more cautious one here


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    small = evaluate.bootstrap_interval([0, 1] * 10)
    large = evaluate.bootstrap_interval([0, 1] * 100)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert evaluate.bootstrap_interval([1, 1, 1]) == (1.0, 1.0)  # the percentile bootstrap's blind spot
    assert evaluate.percent(0.625, 0.55, 0.7) == "62 [55, 70]" and evaluate.percent(0.5) == "50"


def test_cluster_bootstrap_of_items_asked_twice_equals_the_bootstrap_of_the_items_once():
    once = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1]
    twice, labels = once + once, list(range(len(once))) * 2  # every item asked twice, both answers alike
    naive = evaluate.bootstrap_interval(twice)
    clustered = evaluate.cluster_bootstrap_interval(twice, labels)
    assert clustered == evaluate.bootstrap_interval(once)  # same draws: resampling items = resampling pairs
    assert clustered[1] - clustered[0] > naive[1] - naive[0]  # counting twins as independent is too sure
    with pytest.raises(ValueError, match="one cluster label per value"):
        evaluate.cluster_bootstrap_interval([1, 0], [0])


def test_accuracy_report_counts_a_repeated_item_once_in_its_interval():
    report = evaluate.AccuracyReport(
        {"capital": 0.5},
        0.5,
        4,
        (True, True, False, False),
        ("capital",) * 4,
        ("",) * 4,
        ("a", "a", "b", "c"),
    )
    # 4 questions about 3 items (a asked twice): accuracy 1/2, but only 3 independent items behind it
    assert report.interval("capital") == pytest.approx(evaluate.wilson_interval(1.5, 3))
    assert report.interval("capital") != pytest.approx(evaluate.wilson_interval(2, 4))
    assert report.interval() == report.interval("capital")
    with pytest.raises(ValueError, match="no tasks of family 'add'"):
        report.interval("add")


def test_mcnemar_exact_matches_the_binomial_by_hand():
    assert evaluate.mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 2**7)  # 0.125
    assert evaluate.mcnemar_exact(6, 1) == evaluate.mcnemar_exact(1, 6)
    assert evaluate.mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)
    assert evaluate.mcnemar_exact(3, 3) == 1.0 and evaluate.mcnemar_exact(0, 0) == 1.0


def test_paired_comparison_sees_a_difference_that_two_separate_intervals_hide():
    rng = torch.Generator().manual_seed(0)
    base = (torch.rand(100, generator=rng) < 0.5).tolist()
    better = list(base)
    flipped = [i for i, hit in enumerate(base) if not hit][:6]
    for i in flipped:  # A fixes 6 items that B (the base) gets wrong and breaks none
        better[i] = True
    result = evaluate.paired_comparison(better, base)
    assert result.difference == pytest.approx(6 / 100) and (result.only_a, result.only_b) == (6, 0)
    assert 0 < result.low <= result.difference <= result.high  # the paired interval excludes 0
    assert result.p_value == pytest.approx(2 / 2**6)
    separate_a = evaluate.wilson_interval(sum(better), 100)
    separate_b = evaluate.wilson_interval(sum(base), 100)
    assert separate_a[0] < separate_b[1]  # yet the two accuracies' own intervals overlap
    swapped = evaluate.paired_comparison(base, better)  # the sign follows the order of the arguments
    assert swapped.difference == pytest.approx(-result.difference) and swapped.high < 0
    with pytest.raises(ValueError, match="same items"):
        evaluate.paired_comparison([True], [True, False])


def test_question_means_average_the_seeds_of_each_question_in_first_order():
    values, questions = [1, 0, 1, 1, 0, 0], ["q2", "q1", "q3", "q2", "q1", "q3"]  # two seeds of 3 questions
    assert evaluate.question_means(values, questions) == {"q2": 1.0, "q1": 0.0, "q3": 0.5}


def test_sign_flip_test_is_mcnemar_on_single_answers_and_exact_by_hand_on_averaged_ones():
    # One 0/1 answer per question: the differences are +1, -1 or 0, and the test is McNemar's exactly.
    assert evaluate.sign_flip_test([1] * 6 + [-1] + [0] * 5) == evaluate.mcnemar_exact(6, 1)
    # Averaged over two seeds the differences take halves; enumerate the 2^4 sign patterns by hand.
    differences = [1.0, 0.5, 0.5, -0.5, 0.0]
    observed = abs(sum(differences))  # 1.5; the 0 carries no evidence and is dropped
    patterns = [(s1, s2, s3, s4) for s1 in (1, -1) for s2 in (1, -1) for s3 in (1, -1) for s4 in (1, -1)]
    as_extreme = [abs(s1 * 1.0 + s2 * 0.5 + s3 * 0.5 - s4 * 0.5) >= observed for s1, s2, s3, s4 in patterns]
    assert evaluate.sign_flip_test(differences) == pytest.approx(sum(as_extreme) / 16)  # 6/16
    assert evaluate.sign_flip_test([0, 0]) == 1.0
    # Means over seeds lie on a grid (here halves): the null distribution is an exact convolution at any n.
    assert evaluate.sign_flip_test([1.0, 0.5] * 10) == pytest.approx(2 / 2**20)  # 20 positive: one of 2^19
    # The convolution against brute force over all 2^12 sign patterns, on a grid of sixths.
    grid = [1.0, 0.5, -1 / 3, 2 / 3, 0.5, 1 / 6, -0.5, 1.0, 1 / 3, 5 / 6, -1 / 6, 0.5]
    brute = [
        abs(sum(s * v for s, v in zip(signs, grid, strict=True))) for signs in product((1, -1), repeat=12)
    ]
    as_large = sum(b >= abs(sum(grid)) - 1e-9 for b in brute) / len(brute)
    assert evaluate.sign_flip_test(grid) == pytest.approx(as_large, rel=1e-9)
    # Off any grid and beyond 16 units, a seeded Monte Carlo stands in, within its error of the exact p.
    irrational = [math.sqrt(2) * (1 + i / 7) for i in range(20)]
    assert 0 < evaluate.sign_flip_test(irrational) < 1e-3  # all positive: exact p = 2 / 2^20


def test_paired_difference_pools_seeds_per_question_and_matches_paired_comparison_on_one_seed():
    rng = torch.Generator().manual_seed(1)
    a = (torch.rand(60, generator=rng) < 0.6).tolist()
    b = (torch.rand(60, generator=rng) < 0.4).tolist()
    pair = evaluate.paired_comparison(a, b)
    diff = evaluate.paired_difference(a, b)
    assert diff.estimate == pytest.approx(pair.difference) and diff.p_value == pytest.approx(pair.p_value)
    assert (diff.low, diff.high) == pytest.approx((pair.low, pair.high))
    assert (diff.mean_a, diff.mean_b) == pytest.approx((pair.accuracy_a, pair.accuracy_b))
    with pytest.raises(ValueError, match="one value of A and one of B"):
        evaluate.paired_difference([1, 0], [1])


def test_win_tally_with_repeated_prompts_resamples_whole_prompts():
    judged = [1.0, 1.0, 0.5, 0.0] * 5
    once = evaluate.win_tally(judged)
    assert (once.wins, once.ties, once.losses) == (10, 5, 5) and once.share == pytest.approx(10 / 15)
    twice = evaluate.win_tally(judged * 2, clusters=list(range(20)) * 2)  # each prompt judged twice alike
    assert twice.n_units == 20 and twice.share == pytest.approx(once.share)
    with pytest.raises(ValueError, match="1.0 \\(A wins\\), 0.5 \\(tie\\) or 0.0"):
        evaluate.win_tally([0.7])


# --- judges and win rate ----------------------------------------------------------------------------------

PROMPTS = ["What is 2 + 2?", "Largest of: 3 9", "Count: x y z", "What is the capital of Ostrel?"]
REPLIES_A = ["4 (four)", "9 is largest", "3", "Varmal"]
REPLIES_B = ["4", "9", "three words", "Varmal"]  # A longer, A longer, B longer, identical
EXPECTED_VERDICTS = [1.0, 1.0, 0.0, 0.5]


class LongerIsBetter:
    """A pairwise judge (like OllamaJudge) that prefers the longer reply and records what it was asked."""

    def __init__(self):
        self.asked = []

    def compare(self, prompt, reply_a, reply_b):
        self.asked.append(prompt)
        return 0.5 if len(reply_a) == len(reply_b) else float(len(reply_a) > len(reply_b))


class LengthRewardModel(torch.nn.Module):
    """A stand-in reward model whose score is the number of tokens: longer conversations score higher."""

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=attention_mask.sum(dim=1, keepdim=True).float())


def test_win_rate_with_a_pairwise_stub_judge_counts_ties_half_and_skips_identical_replies():
    judge = LongerIsBetter()
    assert evaluate.verdicts(judge, None, PROMPTS, REPLIES_A, REPLIES_B) == EXPECTED_VERDICTS
    assert judge.asked == PROMPTS[:3]  # identical replies never reach the judge
    assert evaluate.win_rate(judge, None, PROMPTS, REPLIES_A, REPLIES_B) == pytest.approx(2.5 / 4)
    assert evaluate.win_rate(judge, None, PROMPTS, REPLIES_B, REPLIES_A) == pytest.approx(1.5 / 4)


def test_judge_agreement_counts_only_prompts_where_exactly_one_model_is_right():
    hits_a, hits_b = [True, False, True, True], [False, True, True, False]
    # prompt 0: A right, judge picks A (agrees); 1: B right, judge picks A (disagrees); 2: both right
    # (not counted); 3: A right, judge calls a tie (half)
    assert evaluate.judge_agreement(EXPECTED_VERDICTS, hits_a, hits_b) == (pytest.approx(0.5), 3)


def test_win_rate_with_a_stub_reward_model_and_judge_accuracy(tokenizer):
    judge = LengthRewardModel()
    assert evaluate.verdicts(judge, tokenizer, PROMPTS, REPLIES_A, REPLIES_B) == EXPECTED_VERDICTS
    records = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in zip(PROMPTS[:3], REPLIES_A[:3], REPLIES_B[:3], strict=True)
    ]
    assert evaluate.judge_accuracy(judge, tokenizer, records) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one reply from each model"):
        evaluate.win_rate(judge, tokenizer, PROMPTS, REPLIES_A, REPLIES_B[:2])


def test_ollama_judge_asks_both_orders_so_a_position_bias_becomes_a_tie(monkeypatch):
    judge = evaluate.OllamaJudge("any-model")
    monkeypatch.setattr(evaluate.OllamaJudge, "_ask", lambda self, prompt, first, second: 1.0)
    assert judge.compare("q", "a", "b") == 0.5  # "the first one" both times: no real preference
    monkeypatch.setattr(evaluate.OllamaJudge, "_ask", lambda self, prompt, first, second: float(first == "a"))
    assert judge.compare("q", "a", "b") == 1.0  # prefers "a" wherever it stands


def test_ollama_judge_without_a_server_says_what_to_do():
    with pytest.raises(RuntimeError, match="No Ollama server answered"):
        evaluate.ollama_judge("llama3.1:70b", host="http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(ValueError, match="ollama:NAME"):
        evaluate.load_judge(None, replace(profiles.PROFILES["cpu"], judge="gpt-4"))


def test_profiles_name_their_judges():
    assert profiles.PROFILES["cpu"].judge == "reward-model"
    assert profiles.PROFILES["spark"].judge.startswith("ollama:")


# --- capability retention ---------------------------------------------------------------------------------


def test_retention_table_reports_before_after_and_change():
    before = evaluate.Capabilities(evaluate.AccuracyReport({"add": 0.8}, 0.8, 10), perplexity=5.0)
    after = evaluate.Capabilities(evaluate.AccuracyReport({"add": 0.6}, 0.6, 10), perplexity=5.5)
    table = evaluate.retention(before, after)
    assert table["raw exact match, add (%)"] == pytest.approx(
        {"before": 80.0, "after": 60.0, "change": -20.0}
    )
    assert table["held-out perplexity"] == pytest.approx({"before": 5.0, "after": 5.5, "change": 0.5})


# --- contamination ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", ["messages", "alpaca", "preference", "feedback"])
def test_the_task_world_splits_do_not_leak_into_each_other(schema):
    test_tasks = build_tasks("test", 50)
    for split in ("train", "validation"):
        report = evaluate.contamination(test_tasks, task_records(split, schema, 150))
        assert report.prompt_leaks == () and report.leak_fraction == 0.0


def test_contamination_catches_a_planted_leak_even_when_reformatted():
    test_tasks = build_tasks("test", 10)
    leaked, reworded, wrong = test_tasks[3], test_tasks[15], test_tasks[25]
    training = task_records("train", "messages", 50) + [to_messages(leaked)]
    shouty = to_alpaca(reworded)
    shouty["instruction"] = "  " + shouty["instruction"].upper() + "  "  # case and spacing changed
    wrong_answer = to_messages(wrong)
    wrong_answer["messages"][1]["content"] = "something else"
    report = evaluate.contamination(test_tasks, training + [shouty, wrong_answer])
    assert set(report.prompt_leaks) == {leaked.prompt, reworded.prompt, wrong.prompt}
    assert set(report.answer_leaks) == {leaked.prompt, reworded.prompt}
    assert report.leak_fraction == pytest.approx(3 / len(test_tasks))


def test_corpus_check_finds_a_raw_question_with_its_answer_as_whole_lines_only():
    task = next(t for t in build_tasks("test", 20) if t.family == "add")
    a, b = task.raw_prompt.removeprefix("add: ").strip().split(" + ")
    longer_operand = raw_text("add", f"1{a} + {b}", task.answer)  # contains the question as a substring
    assert evaluate.in_corpus([task], ["some prose.\n" + longer_operand]) == [False]
    assert evaluate.in_corpus([task], ["some prose.\n" + task.raw_prompt + task.answer + "\nmore"]) == [True]
    report = evaluate.contamination([task], [], corpus=[task.raw_prompt + task.answer])
    assert report.corpus_hits == {"add": 1.0} and report.prompt_leaks == ()


@pytest.mark.parametrize("gap", ANSWER_GAPS)
def test_corpus_check_matches_every_gap_the_corpus_uses(gap):
    task = next(t for t in build_tasks("test", 20) if t.family == "max")
    subject = task.raw_prompt.removeprefix("max: ").removesuffix("\n")
    line = raw_text("max", subject, task.answer, gap)
    assert evaluate.in_corpus([task], ["prose.\n" + line + "\nmore prose."]) == [True]
    wrong = raw_text("max", subject, task.distractors[0], gap)
    assert evaluate.in_corpus([task], ["prose.\n" + wrong + "\nmore prose."]) == [False]


def test_available_judge_falls_back_to_the_reward_model_and_logs_the_skip(monkeypatch, tmp_path):
    log = tmp_path / "skips.jsonl"
    monkeypatch.setenv(profiles.SKIP_LOG_ENV, str(log))
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")  # nothing listens on port 9
    trained = []
    monkeypatch.setattr(evaluate, "reward_judge", lambda tokenizer, profile, **kw: trained.append(kw) or "rm")
    spark = replace(profiles.PROFILES["cpu"], judge="ollama:llama3.1:70b")

    judge, note = evaluate.available_judge("tok", spark, steps=3)
    assert judge == "rm" and trained == [{"steps": 3}]
    assert note.startswith("Skipped here: the Ollama judge `llama3.1:70b`. No Ollama server answered")
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["what"] == "the Ollama judge `llama3.1:70b`"
    # the cpu profile's judge is the reward model itself: no note, nothing logged
    assert evaluate.available_judge("tok", profiles.PROFILES["cpu"], steps=3) == ("rm", "")
    assert len(log.read_text().splitlines()) == 1
