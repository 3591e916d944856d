"""The from-scratch preference losses against TRL 1.x on the same model and batch, and against hand-worked
cases.

Tolerances come from float32's machine epsilon and the number of terms a value sums. TRL computes
log-probabilities with a chunked kernel (DPO, KTO) and `selective_log_softmax` (CPO, ORPO) rather than a
plain `log_softmax`, so the two sides agree to float32 rounding, not bitwise: a sum of n float32 terms of one
sign is good to n·eps relative (`summed_rel`), and a loss or logged value built from a few such sums to that
much of the sums' size (`trl_atol`). The hand-worked cases run in float64 against the formula (agreement to
a few float64 eps) and in float32 (a few float32 eps per operation).
"""

from __future__ import annotations

import inspect
import math
import tempfile

import pytest
import torch

from ftcourse import prefs, profiles
from ftcourse.toy import preferences as toy_prefs

EPS32 = torch.finfo(torch.float32).eps


def summed_rel(n_terms: int) -> float:
    """Relative tolerance of a float32 sum of `n_terms` terms of one sign: each addition rounds by eps/2."""
    return n_terms * EPS32


def trl_atol(batch: dict, logps: torch.Tensor, weight: float) -> float:
    """Absolute tolerance on a value that is `weight` times a combination of up to four log-prob sums.

    Each sum runs over the batch's width - 1 positions and is good to summed_rel(width - 1) of its size,
    at most max|logps|; four of them, times the method's weight (beta, lambda, lambda_D), bound the gap.
    """
    width = batch["input_ids"].shape[1]
    return 4 * weight * summed_rel(width - 1) * logps.abs().max().item()


def by_hand(dtype: torch.dtype, n_ops: int) -> float:
    """Relative tolerance of a hand-worked loss: `n_ops` float operations, each good to eps."""
    return n_ops * torch.finfo(dtype).eps


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer()


@pytest.fixture(scope="module")
def pairs():
    # Both kinds, so chosen and rejected replies differ in length (the concise pairs) and in content.
    return toy_prefs.preference_pairs("train", 2)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield folder


def _dataset(records):
    from datasets import Dataset

    return Dataset.from_list(records)


def _perturb_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Give LoRA's B matrices (zero at init) random values, so the policy differs from the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def _pairs(n: int) -> list[dict]:
    """`n` task-world preference records, the shape of a standard run's training data."""
    return toy_prefs.preference_records(toy_prefs.preference_pairs("train", n)[:n])


def _trainer(method, tokenizer, records, scratch, **kwargs):
    model = profiles.load_base()
    trainer = prefs.preference_trainer(
        method, model, tokenizer, _dataset(records), steps=1, batch_size=4, output_dir=scratch, **kwargs
    )
    trainer.model.eval()
    return trainer


# --- sequence_logprobs -----------------------------------------------------------------------------------


class ConstantLogits(torch.nn.Module):
    """A stand-in model whose logits are the same at every position: logit(token k) = scale * k."""

    def __init__(self, vocab: int = 11, scale: float = 0.01, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.vocab, self.scale, self.dtype = vocab, scale, dtype

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = (self.scale * torch.arange(self.vocab, dtype=torch.float32)).to(self.dtype)
        return type("Out", (), {"logits": logits.expand(*input_ids.shape, self.vocab)})()


def test_sequence_logprobs_by_hand():
    # Row 0: prompt 3 4 5, completion 6 7, one pad. Row 1: prompt 1 2, completion 9 8 10.
    batch = {
        "input_ids": torch.tensor([[3, 4, 5, 6, 7, 0], [1, 2, 9, 8, 10, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0]]),
    }
    vocab = 11
    log_z = math.log(sum(math.exp(0.01 * k) for k in range(vocab)))  # float64
    out = prefs.sequence_logprobs(ConstantLogits(vocab), batch)
    # float32 all the way: a log-softmax over `vocab` logits, then a sum over the 5 positions. Each of
    # those vocab + 5 operations rounds by at most eps/2 of the running size, so (vocab + 5)·eps relative
    # bounds the gap to the float64 formula (about 2e-5 on totals near 10, against 0.01 for one token
    # miscounted and 2.4 for a token taken from the wrong row or position).
    rel = summed_rel(vocab + batch["input_ids"].shape[1] - 1)
    # log p(token k) = 0.01 k - log Z, whatever came before it; only completion tokens count.
    expected_total = [0.01 * (6 + 7) - 2 * log_z, 0.01 * (9 + 8 + 10) - 3 * log_z]
    assert out.total.tolist() == pytest.approx(expected_total, rel=rel)
    assert out.n_tokens.tolist() == [2, 3]
    assert out.mean.tolist() == pytest.approx([expected_total[0] / 2, expected_total[1] / 3], rel=rel)
    # Every real token after the first (the prompt too, never the padding).
    expected_all = [0.01 * (4 + 5 + 6 + 7) - 4 * log_z, 0.01 * (2 + 9 + 8 + 10) - 4 * log_z]
    assert out.all_total.tolist() == pytest.approx(expected_all, rel=rel)
    chosen, rejected = out.halves()
    assert chosen.total.shape == rejected.total.shape == (1,)


def test_sequence_logprobs_of_a_bf16_model_are_float32_exact():
    # The spark profile runs in bf16. Log-probabilities must be taken in float32: bf16 keeps 8 bits of
    # mantissa, so a log-softmax of about -3 in bf16 is off by up to 0.008 per token, and a sum over a reply
    # moves DPO's margins by more than training does in a few steps.
    model = ConstantLogits(scale=0.37, dtype=torch.bfloat16)
    batch = {
        "input_ids": torch.tensor([[3, 4, 5, 6, 7, 10]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 0, 1, 1, 1, 1]]),
    }
    logits = [float(v) for v in (0.37 * torch.arange(11, dtype=torch.float32)).to(torch.bfloat16)]
    log_z = math.log(sum(math.exp(v) for v in logits))
    expected = sum(logits[k] - log_z for k in (5, 6, 7, 10))  # the four completion tokens
    out = prefs.sequence_logprobs(model, batch)
    assert out.total.dtype == torch.float32
    # float32 from the bf16 logits on: (vocab + positions)·eps relative, about 1e-5 here; a bf16
    # log-softmax would be off by up to 0.008 per token.
    assert out.total.item() == pytest.approx(expected, rel=summed_rel(11 + 5))


def test_sequence_logprobs_rejects_bad_batches():
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="missing \\['completion_mask'\\]"):
        prefs.sequence_logprobs(ConstantLogits(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with pytest.raises(ValueError, match="rows \\[0\\] have no completion tokens"):
        prefs.sequence_logprobs(
            ConstantLogits(),
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "completion_mask": torch.zeros_like(ids),
            },
        )


# --- DPO -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dpo_loss_by_hand(dtype):
    # c - c_ref = 0.5, r - r_ref = -0.5, so beta * (0.5 + 0.5) = 0.1 and the loss is log(1 + e^-0.1).
    out = prefs.dpo_loss(*(torch.tensor([v], dtype=dtype) for v in (-1.0, -2.0, -1.5, -1.5)))
    rel = by_hand(dtype, 8)  # three subtractions, a product, log-sigmoid (about three), the mean
    assert out.loss.dtype == dtype
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), rel=rel)  # a sign error: e^+0.1
    assert out.chosen_rewards.item() == pytest.approx(0.05, rel=rel)
    assert out.rejected_rewards.item() == pytest.approx(-0.05, rel=rel)
    assert out.accuracy == 1.0
    assert out.metrics()["rewards/margins"] == pytest.approx(0.1, rel=rel)


def test_dpo_matches_trl(tokenizer, pairs, scratch):
    trainer = _trainer("dpo", tokenizer, toy_prefs.preference_records(pairs[:4]), scratch)
    _perturb_lora(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
        chosen, rejected = prefs.sequence_logprobs(trainer.model, batch).halves()
        with trainer.model.disable_adapter():  # the reference: the same model, adapter off
            ref_chosen, ref_rejected = prefs.sequence_logprobs(trainer.model, batch).halves()
    ours = prefs.dpo_loss(chosen.total, rejected.total, ref_chosen.total, ref_rejected.total, beta=0.1)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    sums = torch.cat([chosen.total, rejected.total, ref_chosen.total, ref_rejected.total])
    atol = trl_atol(batch, sums, weight=0.1)
    assert ours.loss.item() == pytest.approx(trl_loss, abs=atol)
    assert abs(ours.loss.item() - math.log(2)) > 10 * atol  # the policy really differs from the reference
    for key, value in ours.metrics().items():
        if key != "loss":
            assert value == pytest.approx(logged[key], abs=atol), key
    # Summed over completion tokens only: an unmasked prompt would change these by whole nats.
    rel = summed_rel(batch["input_ids"].shape[1] - 1)
    assert chosen.total.mean().item() == pytest.approx(logged["logps/chosen"], rel=rel)
    assert rejected.total.mean().item() == pytest.approx(logged["logps/rejected"], rel=rel)


# --- SimPO and ORPO (trl.experimental) --------------------------------------------------------------------


def _paired_batch(trainer, n: int) -> tuple[dict, dict]:
    """TRL's CPO/ORPO batch of `n` pairs, and the same rows in sequence_logprobs' format."""
    raw = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    pad_id = getattr(trainer, "padding_value", None)
    pad_id = (
        trainer.pad_token_id if pad_id is None else pad_id
    )  # CPO names it pad_token_id, ORPO padding_value
    joined = trainer.concatenated_inputs(raw, padding_value=pad_id)
    ours = {
        "input_ids": joined["concatenated_input_ids"],
        "attention_mask": joined["concatenated_attention_mask"],
        "completion_mask": (joined["concatenated_labels"] != -100).long(),
    }
    return raw, ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simpo_loss_by_hand(dtype):
    # Averages -0.5 (chosen) and -1.0 (rejected): beta * 0.5 - gamma = 2 * 0.5 - 1 = 0, loss log 2.
    chosen, rejected = torch.tensor([-0.5], dtype=dtype), torch.tensor([-1.0], dtype=dtype)
    rel = by_hand(dtype, 6)  # a subtraction, a product, the margin, log-sigmoid (about three)
    out = prefs.simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    assert out.loss.item() == pytest.approx(math.log(2), rel=rel)
    out = prefs.simpo_loss(chosen, rejected, beta=2.0, gamma=0.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=rel)
    assert out.chosen_rewards.item() == pytest.approx(-1.0, rel=rel)
    # The default margin is TRL's (CPOConfig.simpo_gamma), so the loss and the trainer agree by default.
    from trl.experimental.cpo import CPOConfig

    assert prefs.SIMPO_GAMMA == CPOConfig.simpo_gamma == prefs.METHOD_DEFAULTS["simpo"]["gamma"] == 0.5
    assert inspect.signature(prefs.simpo_loss).parameters["gamma"].default == prefs.SIMPO_GAMMA
    out = prefs.simpo_loss(chosen, rejected, beta=2.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=rel)


def test_simpo_matches_trl(tokenizer, pairs, scratch):
    trainer = _trainer("simpo", tokenizer, toy_prefs.preference_records(pairs[:4]), scratch, peft_config=None)
    assert trainer.args.simpo_gamma == prefs.SIMPO_GAMMA and trainer.args.cpo_alpha == 0.0
    raw, batch = _paired_batch(trainer, 4)
    with torch.no_grad():
        trl_loss, logged = trainer.get_batch_loss_metrics(trainer.model, raw)
        chosen, rejected = prefs.sequence_logprobs(trainer.model, batch).halves()
    ours = prefs.simpo_loss(chosen.mean, rejected.mean, beta=2.0)
    atol = trl_atol(batch, torch.cat([chosen.mean, rejected.mean]), weight=2.0)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=atol)
    for key, value in ours.metrics().items():
        if key != "loss":
            assert value == pytest.approx(logged[key], abs=atol), key
    # The pairs differ in length, so summed log-probs (no length normalisation) give another loss.
    assert not torch.equal(chosen.n_tokens, rejected.n_tokens)
    unnormalised = prefs.simpo_loss(chosen.total, rejected.total, beta=2.0)
    assert abs(unnormalised.loss.item() - trl_loss.item()) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orpo_loss_by_hand(dtype):
    # p_w = e^-0.5, p_l = e^-1: log odds = log(p/(1-p)); the loss is nll - lam * log sigmoid(difference).
    p_w, p_l = math.exp(-0.5), math.exp(-1.0)
    log_odds = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    out = prefs.orpo_loss(
        torch.tensor([-0.5], dtype=dtype),
        torch.tensor([-1.0], dtype=dtype),
        nll=torch.tensor(2.0, dtype=dtype),
        lam=0.1,
    )
    expected = 2.0 - 0.1 * math.log(1 / (1 + math.exp(-log_odds)))
    # Two log1mexp (exp, log1p: about three each), four subtractions, log-sigmoid, mean, product, sum.
    # log odds is a difference of terms near 1 that cancel to 0.6: allow that much more relative error.
    rel = by_hand(dtype, 16)
    assert out.loss.item() == pytest.approx(expected, rel=rel)
    assert out.extra["log_odds_chosen"] == pytest.approx(log_odds, rel=rel * 4)
    assert prefs.log1mexp(torch.tensor([-1e-6, -5.0])).tolist() == pytest.approx(
        [math.log(1e-6), math.log1p(-math.exp(-5.0))], rel=1e-4
    )


def test_orpo_matches_trl_which_scores_the_prompt(tokenizer, pairs, scratch):
    trainer = _trainer("orpo", tokenizer, toy_prefs.preference_records(pairs[:4]), scratch, peft_config=None)
    raw, batch = _paired_batch(trainer, 4)
    with torch.no_grad():
        trl_loss, logged = trainer.get_batch_loss_metrics(trainer.model, raw)
        chosen, rejected = prefs.sequence_logprobs(trainer.model, batch).halves()
    trl_like = prefs.orpo_loss(
        chosen.mean, rejected.mean, prefs.orpo_nll(chosen, include_prompt=True), lam=0.1
    )
    # The NLL (weight 1) averages every token of the chosen rows, prompts included: a sum of that many
    # terms, good to summed_rel(n) of its size; the odds-ratio term (weight lambda) is smaller.
    nll = prefs.orpo_nll(chosen, include_prompt=True)
    n_terms = int(chosen.all_tokens.sum())
    atol = (
        4 * summed_rel(n_terms) * torch.cat([chosen.mean, rejected.mean, nll.reshape(1)]).abs().max().item()
    )
    assert trl_like.loss.item() == pytest.approx(trl_loss.item(), abs=atol)
    assert trl_like.extra["nll_loss"] == pytest.approx(float(logged["nll_loss"]), abs=atol)
    assert trl_like.extra["log_odds_ratio"] == pytest.approx(float(logged["log_odds_ratio"]), abs=atol)
    assert trl_like.metrics()["rewards/margins"] == pytest.approx(float(logged["rewards/margins"]), abs=atol)
    # Pinned: TRL's NLL covers the prompt; the paper's (completion only) is a different number.
    paper = prefs.orpo_loss(chosen.mean, rejected.mean, prefs.orpo_nll(chosen), lam=0.1)
    assert abs(paper.loss.item() - trl_loss.item()) > 1e-3


# --- KTO -------------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kto_loss_by_hand(dtype):
    # Two desirable rows (log-ratios 1, 3), one undesirable (-2); z0 = max(0, mean(0.5, -1.5)) = 0.
    z0 = prefs.kto_reference_point(
        torch.tensor([0.5, -1.5], dtype=dtype), torch.tensor([0.0, 0.0], dtype=dtype)
    )
    assert z0.item() == 0.0  # clamped at zero
    logps, ref_logps = torch.tensor([1.0, 3.0, -2.0], dtype=dtype), torch.zeros(3, dtype=dtype)
    labels = torch.tensor([True, True, False])
    weights = {"beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 2.0}
    rel = by_hand(dtype, 8)  # a subtraction, the margin, a product, the sigmoid (about three), 1 - it, mean
    out = prefs.kto_loss(logps, ref_logps, labels, z0, **weights)
    expected = ((1 - _sigmoid(0.5)) + (1 - _sigmoid(1.5)) + 2 * (1 - _sigmoid(0.5 * 2.0))) / 3
    assert out.loss.item() == pytest.approx(expected, rel=rel)  # a sign error on the undesirable side fails
    assert out.metrics()["rewards/chosen"] == pytest.approx(1.0, rel=rel)
    assert out.metrics()["rewards/rejected"] == pytest.approx(-1.0, rel=rel)
    z0 = prefs.kto_reference_point(
        torch.tensor([2.0, 1.0], dtype=dtype), torch.tensor([0.5, 0.5], dtype=dtype)
    )
    assert z0.item() == pytest.approx(1.0, rel=rel)
    # A positive reference point: desirable rows must rise above z0 = 1, undesirable ones fall below it.
    out = prefs.kto_loss(logps, ref_logps, labels, z0, **weights)
    expected = ((1 - _sigmoid(0.5 * 0.0)) + (1 - _sigmoid(0.5 * 2.0)) + 2 * (1 - _sigmoid(0.5 * 3.0))) / 3
    assert out.loss.item() == pytest.approx(expected, rel=rel)
    assert out.metrics()["kl"] == pytest.approx(1.0, rel=rel)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kto_loss_clamps_a_negative_reference_point(dtype):
    # The paper's rule is z0 = max(0, KL estimate), and TRL clamps inside its loss: a z0 of -3 handed to the
    # loss directly must count as 0. Unclamped, the desirable row (log-ratio 1) would look 4 nats above z0.
    logps, ref_logps = torch.tensor([1.0, -2.0], dtype=dtype), torch.zeros(2, dtype=dtype)
    labels = torch.tensor([True, False])
    clamped = ((1 - _sigmoid(0.5 * 1.0)) + (1 - _sigmoid(0.5 * 2.0))) / 2
    unclamped = ((1 - _sigmoid(0.5 * 4.0)) + (1 - _sigmoid(0.5 * -1.0))) / 2
    assert abs(clamped - unclamped) > 0.01  # the two rules give different losses on this input
    out = prefs.kto_loss(logps, ref_logps, labels, torch.tensor(-3.0, dtype=dtype), beta=0.5)
    assert out.loss.item() == pytest.approx(clamped, rel=by_hand(dtype, 8))
    assert out.metrics()["kl"] == 0.0  # logged as used, like TRL's "kl"
    assert (
        out.loss.item() == prefs.kto_loss(logps, ref_logps, labels, torch.tensor(0.0), beta=0.5).loss.item()
    )
    assert (
        prefs.kto_loss(logps, ref_logps, labels, -3.0, beta=0.5).loss.item() == out.loss.item()
    )  # a float too


def _raise_likelihood(
    model: torch.nn.Module, batch: dict, steps: int = 2, learning_rate: float = 0.01
) -> None:
    """A few Adam steps on the LoRA weights that raise log p of `batch`'s completions."""
    params = [param for name, param in model.named_parameters() if "lora_" in name]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    for _ in range(steps):
        loss = -prefs.sequence_logprobs(model, batch).total.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_kto_matches_trl_on_both_labels_unequal_weights_and_positive_z0(tokenizer, pairs, scratch):
    # Issue 19: both branches (desirable and undesirable rows in one batch), lambda_D != lambda_U, and a
    # reference point above zero, so that neither the clamp nor a missing z0 can hide a difference.
    records = toy_prefs.feedback_records(pairs[:6], desirable_per_undesirable=0.5)
    weights = {"desirable_weight": 1.5, "undesirable_weight": 1.0}
    trainer = _trainer("kto", tokenizer, records, scratch, kto_weights=tuple(weights.values()))
    assert (trainer.args.desirable_weight, trainer.args.undesirable_weight) == tuple(weights.values())
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    labels = torch.as_tensor(batch["label"], dtype=torch.bool)
    assert 0 < labels.sum() < len(labels), "the test batch needs both labels"
    kl_batch = {key: batch[f"KL_{key}"] for key in prefs.BATCH_KEYS}
    # TRL's z0 is the mean log-ratio on the rotated completions: train the adapter to like them, so z0 > 0.
    _raise_likelihood(trainer.model, kl_batch)
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
        policy = prefs.sequence_logprobs(trainer.model, batch).total
        policy_kl = prefs.sequence_logprobs(trainer.model, kl_batch).total
        with trainer.model.disable_adapter():
            ref = prefs.sequence_logprobs(trainer.model, batch).total
            ref_kl = prefs.sequence_logprobs(trainer.model, kl_batch).total
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    sums = torch.cat([policy, ref, policy_kl, ref_kl])
    # The loss is lambda (1 - sigmoid(beta (r - z0))): slope at most lambda beta / 4 in r and z0. Rewards are
    # beta r; z0 itself is a mean of log-ratios (weight 1).
    atol = {"loss": trl_atol(batch, sums, weight=1.5 * 0.1), "rewards": trl_atol(batch, sums, weight=0.1)}
    atol["kl"] = trl_atol(batch, sums, weight=1.0)
    z0 = prefs.kto_reference_point(policy_kl, ref_kl)
    assert z0.item() > 100 * atol["kl"], "z0 must be positive (not clamped) for this test"
    ours = prefs.kto_loss(policy, ref, labels, z0, beta=0.1, **weights)
    assert ours.loss.item() == pytest.approx(trl_loss, abs=atol["loss"])
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        tolerance = atol["kl"] if key == "kl" else atol["rewards"]
        assert ours.metrics()[key] == pytest.approx(logged[key], abs=tolerance), key
    # Each of them matters on this batch: swapped weights, or z0 = 0, give losses TRL's does not match.
    swapped = prefs.kto_loss(policy, ref, labels, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    without_z0 = prefs.kto_loss(policy, ref, labels, torch.tensor(0.0), beta=0.1, **weights)
    for other in (swapped, without_z0):
        assert abs(other.loss.item() - trl_loss) > 10 * atol["loss"]


# --- trainer entry point ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", prefs.METHODS)
def test_preference_trainer_steps_offline(method, tokenizer, pairs, scratch, no_network):
    records = (
        toy_prefs.feedback_records(pairs[:4], 0.5)
        if method == "kto"
        else toy_prefs.preference_records(pairs[:4])
    )
    trainer = _trainer(method, tokenizer, records, scratch)
    trainer.model.train()
    trainer.train()
    assert trainer.state.global_step == 1
    assert no_network == []


def test_preference_trainer_errors(tokenizer, scratch):
    with pytest.raises(ValueError, match="method must be one of"):
        prefs.preference_trainer("ppo", None, tokenizer, None, output_dir=scratch)
    with pytest.raises(ValueError, match="needs a frozen reference"):
        prefs.preference_trainer("dpo", None, tokenizer, None, peft_config=None, output_dir=scratch)
    with pytest.raises(ValueError, match="save_steps must be a positive number"):
        prefs.preference_trainer("dpo", None, tokenizer, None, save_steps=0, output_dir=scratch)


def test_preference_trainer_saves_checkpoints_and_shows_progress_when_asked(tokenizer, pairs, tmp_path):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    def callbacks(trainer):
        return {type(c) for c in trainer.callback_handler.callbacks}

    records = toy_prefs.preference_records(pairs[:4])
    quiet = _trainer("dpo", tokenizer, records, str(tmp_path / "quiet"))
    assert quiet.args.save_strategy == "no" and quiet.args.disable_tqdm
    assert not callbacks(quiet) & {ProgressCallback, PrinterCallback}
    kept = _trainer("dpo", tokenizer, records, str(tmp_path / "kept"), save_steps=1, progress=True)
    assert kept.args.save_strategy == "steps" and kept.args.save_steps == 1
    assert ProgressCallback in callbacks(kept) and PrinterCallback not in callbacks(kept)
    kept.args.max_steps = 2
    kept.model.train()
    kept.train()
    assert sorted(p.name for p in (tmp_path / "kept").glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]


def test_max_length_fits_the_data_on_a_hub_profile_and_stays_on_cpu(tokenizer, pairs, scratch, capsys):
    from ftcourse import data
    from ftcourse.toy import standin

    records = toy_prefs.preference_records(pairs[:8])
    cpu = _trainer("dpo", tokenizer, records, scratch)
    lengths = data.sequence_lengths(records, tokenizer)
    assert cpu.args.max_length == prefs.TOY_MAX_LENGTH == cpu.truncation.max_length
    assert cpu.truncation == data.check_lengths(lengths, prefs.TOY_MAX_LENGTH)  # kept, even with nothing cut
    assert cpu.truncation.rows_cut == 0 and capsys.readouterr().out == ""
    with pytest.raises(data.TruncationError, match=r"the dpo rows: 8 of 8 rows .* max_length=4"):
        _trainer("dpo", tokenizer, records, scratch, max_length=4)
    cut = _trainer("dpo", tokenizer, records, scratch, max_length=4, allow_truncation=True)
    assert cut.truncation.rows_cut == 8 and cut.truncation.sentence() in capsys.readouterr().out
    with pytest.MonkeyPatch.context() as patch:
        for key, value in standin.standin_environment().items():
            patch.setenv(key, value)
        hub_tokenizer, model = profiles.load_tokenizer(), profiles.load_base()
        rows = list(data.load_records("preference", "train", size=8))
        trainer = prefs.preference_trainer(
            "dpo", model, hub_tokenizer, _dataset(rows), steps=1, batch_size=2, output_dir=scratch
        )
    fitted = data.length_limit(data.sequence_lengths(rows, hub_tokenizer))
    assert trainer.args.max_length == trainer.truncation.max_length == fitted
    assert fitted % 64 == 0 and trainer.truncation.share <= 0.05


@pytest.mark.parametrize("fresh_interpreter", [False, True], ids=["forked-from-template", "spawned"])
def test_step_cost_in_a_fresh_process(fresh_interpreter, no_network):
    # Never a fork of this process: a template interpreter's fork (cpu default) or a spawned interpreter
    # (CUDA default). No `if __name__ == "__main__"` guard is needed in the caller, and on the cpu profile
    # the result has the five host figures it always had, no CUDA reading.
    cost = prefs.step_cost("simpo", _pairs(2), steps=1, batch_size=2, fresh_interpreter=fresh_interpreter)
    host = {"setup_mib", "peak_mib", "seconds_per_step", "cpu_seconds_per_step", "trainable_parameters"}
    assert set(cost) == host
    assert cost["peak_mib"] >= cost["setup_mib"] > 0
    assert cost["cpu_seconds_per_step"] > 0 and cost["trainable_parameters"] > 0
    assert no_network == []


def test_step_cost_refuses_and_reports_errors():
    from dataclasses import replace

    with pytest.raises(ValueError, match="method must be one of"):
        prefs.step_cost("ppo", _pairs(16))
    with pytest.raises(ValueError, match="threads must be at least 1"):
        prefs.step_cost("dpo", _pairs(16), threads=0)
    with pytest.raises(ValueError, match="2 steps of 8 rows need 16 records, got 2"):
        prefs.step_cost("dpo", _pairs(2))
    # A profile the child cannot use fails there; the caller gets the child's error as text, not a hang,
    # and the template interpreter survives its child's failure.
    missing = "/nonexistent/model"
    broken = replace(profiles.PROFILES["cpu"], models={"lora": missing, "qlora": missing})
    with pytest.raises(RuntimeError, match=r"measuring dpo \(LoRA\) failed: \w+"):
        prefs.step_cost("dpo", _pairs(2), steps=1, batch_size=2, profile=broken)
    assert prefs.step_cost("orpo", _pairs(2), steps=1, batch_size=2)["peak_mib"] > 0


def test_step_cost_sees_the_reference_copy_of_full_dpo():
    # Full fine-tuning: DPO's set-up holds a frozen copy of the model as its reference, SimPO's does not.
    # The copy is the model's float32 weights (20 MiB for the toy model); the set-up figures of two
    # processes otherwise differ by a few MiB (library state), so half the copy is the robust bound.
    weights_mib = sum(p.numel() * p.element_size() for p in profiles.load_base().parameters()) / 2**20
    dpo = prefs.step_cost("dpo", _pairs(2), full=True, steps=1, batch_size=2)
    simpo = prefs.step_cost("simpo", _pairs(2), full=True, steps=1, batch_size=2)
    assert dpo["trainable_parameters"] == simpo["trainable_parameters"]  # both train every weight
    assert dpo["setup_mib"] - simpo["setup_mib"] > 0.5 * weights_mib, (dpo, simpo, weights_mib)
    assert dpo["peak_mib"] >= dpo["setup_mib"] and simpo["peak_mib"] >= simpo["setup_mib"]


def test_step_cost_spawns_under_the_spark_standins(monkeypatch):
    # The spark path in CI: the stand-in profile reaches the child through the environment and the request.
    from ftcourse.toy import standin

    for key, value in standin.standin_environment().items():
        monkeypatch.setenv(key, value)
    profile = profiles.active_profile()
    assert profile.name == "spark" and profile.minimal
    # The spawned interpreter, the path a CUDA profile takes, here on the stand-in's CPU device.
    from ftcourse import data

    feedback = list(data.load_records("feedback", "train", size=2, profile=profile))
    cost = prefs.step_cost("kto", feedback, steps=1, batch_size=2, profile=profile, fresh_interpreter=True)
    assert cost["peak_mib"] >= cost["setup_mib"] > 0 and cost["trainable_parameters"] > 0
    assert "cuda_peak_mib" not in cost  # FTCOURSE_DEVICE=cpu in the stand-in environment


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA memory reading needs one")
def test_step_cost_reads_cuda_memory_on_a_cuda_profile():
    from dataclasses import replace

    cuda = replace(profiles.PROFILES["cpu"], device="cuda", dtype="bfloat16")
    torch.cuda.init()  # CUDA set up in the caller, as by a chapter's earlier cells: the child must not care
    cost = prefs.step_cost("dpo", _pairs(2), steps=1, batch_size=2, profile=cuda)
    assert cost["cuda_peak_mib"] >= cost["cuda_setup_mib"] > 0, cost
    assert cost["peak_mib"] > 0  # host memory beside it


def test_set_pad_token_prefers_llama3s_reserved_pad_token():
    tok = profiles.load_tokenizer()  # a fresh instance: the module's fixture stays untouched
    tok.pad_token = None  # as Llama 3.1 ships
    assert prefs.set_pad_token(tok).pad_token == tok.eos_token  # no reserved pad token in this vocabulary
    tok.pad_token = None
    tok.add_special_tokens({"additional_special_tokens": [prefs.LLAMA3_PAD_TOKEN]})
    assert prefs.set_pad_token(tok).pad_token == prefs.LLAMA3_PAD_TOKEN
    tok.pad_token = tok.eos_token
    assert prefs.set_pad_token(tok).pad_token == tok.eos_token  # a pad token already set is kept


def test_simpo_trains_on_the_llama3_standin_which_has_no_pad_token(scratch):
    # The spark path: Llama 3.1's tokenizer has no pad token (TRL's CPO/ORPO collators then refuse to pad),
    # the weights are bf16, and the pairs come in the hub's conversational layout.
    from ftcourse import data
    from ftcourse.toy import standin

    with pytest.MonkeyPatch.context() as patch:
        for key, value in standin.standin_environment().items():
            patch.setenv(key, value)
        tokenizer, model = profiles.load_tokenizer(), profiles.load_base()
        assert tokenizer.pad_token is None and model.dtype == torch.bfloat16
        records = list(data.load_records("preference", "train", size=4))
        trainer = prefs.preference_trainer(
            "simpo", model, tokenizer, _dataset(records), steps=1, batch_size=2, output_dir=scratch
        )
        assert tokenizer.pad_token == prefs.LLAMA3_PAD_TOKEN
        trainer.train()
        compared = prefs.trl_comparison("simpo", trainer, n_rows=2)
    ours, theirs = compared["loss"]
    # TRL's CPO keeps the log-probabilities in the model's bf16 (8 mantissa bits), ours are float32.
    assert math.isfinite(ours) and ours == pytest.approx(theirs, abs=0.1)


# --- KTO's weights from the label ratio --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_desirable", "n_undesirable", "ratio", "expected"),
    [
        (5, 5, 1.0, (1.0, 1.0)),  # 1:1 data: no up-weighting, lambda_D n_D / (lambda_U n_U) = 5/5 = 1
        (2, 8, 1.0, (4.0, 1.0)),  # 1:4 data: lambda_D = 8/2 = 4, the old hard-coded pair
        (2, 8, 4 / 3, (16 / 3, 1.0)),  # the top of the range: lambda_D = (4/3) * 4
        (8, 2, 1.0, (1.0, 4.0)),  # more thumbs-up than down: the undesirable side is weighted up instead
        (3, 7, 1.0, (7 / 3, 1.0)),
    ],
)
def test_kto_weights_by_hand(n_desirable, n_undesirable, ratio, expected):
    labels = [True] * n_desirable + [False] * n_undesirable
    weights = prefs.kto_weights(labels, ratio=ratio)
    assert weights == pytest.approx(expected, rel=by_hand(torch.float64, 2))
    assert prefs.kto_weight_ratio(weights, labels) == pytest.approx(ratio, rel=by_hand(torch.float64, 4))
    assert prefs.kto_weights_in_range(weights, labels)
    assert min(weights) == 1.0  # the commoner label keeps weight 1


def test_kto_weights_outside_the_range_and_one_label_data():
    labels = [True] * 2 + [False] * 8
    assert not prefs.kto_weights_in_range((1.0, 1.0), labels)  # 2 / 8 = 0.25 < 1
    assert not prefs.kto_weights_in_range((6.0, 1.0), labels)  # 12 / 8 = 1.5 > 4/3
    assert prefs.kto_weights_in_range((4.0, 1.0), labels) and prefs.kto_weights_in_range(
        (16 / 3, 1.0), labels
    )
    with pytest.raises(ValueError, match="paper's range"):
        prefs.kto_weights(labels, ratio=1.5)
    with pytest.raises(ValueError, match="needs both labels"):
        prefs.kto_weights([True, True])


def test_kto_weights_silence_trls_range_warning(tokenizer, pairs, scratch, caplog):
    # TRL's KTOTrainer checks the same rule on the data it is given and warns outside it: computed weights
    # pass, the unweighted (1, 1) on 1:4 data does not.
    records = toy_prefs.feedback_records(pairs[:8], desirable_per_undesirable=0.25)
    labels = [r["label"] for r in records]
    assert prefs.kto_label_counts(labels) == (2, 8)
    for weights, warns in ((prefs.kto_weights(labels), False), ((1.0, 1.0), True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="trl"):
            _trainer("kto", tokenizer, records, scratch, kto_weights=weights)
        assert any("ideal range" in r.getMessage() for r in caplog.records) == warns, weights


# --- the end of turn: completions end where SFT trained them to -------------------------------------------


def test_completions_end_at_the_end_of_turn_token(tokenizer, pairs):
    """ChatML writes a newline after <|im_end|>: it is no part of the scored completion, in either form."""
    record = pairs[0].record()
    batch = prefs.collate_pairs(tokenizer, [record])
    ends = [
        row[mask.bool()].tolist()[-1]
        for row, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True)
    ]
    assert ends == [tokenizer.eos_token_id] * 2  # each completion's last scored token is <|im_end|>
    text = prefs.end_at_end_of_turn([record], tokenizer)[0]
    assert isinstance(text["prompt"], str) and text["chosen"] == pairs[0].chosen
    assert text["prompt"].endswith("<|im_start|>assistant\n")
    same = prefs.collate_pairs(tokenizer, [text])
    assert all(torch.equal(same[k], batch[k]) for k in prefs.BATCH_KEYS)  # both forms score the same tokens
    feedback = toy_prefs.feedback_records(pairs[:2], 0.5)
    assert (
        prefs.end_at_end_of_turn(feedback, tokenizer)[0]["completion"]
        == feedback[0]["completion"][0]["content"]
    )


def test_trl_tokenizes_the_plain_text_form_as_collate_pairs_does(tokenizer, pairs, scratch):
    """TRL appends EOS to a plain-text reply and nothing else: its tokens equal collate_pairs' (DPO's)."""
    records = toy_prefs.preference_records(pairs[:2])
    trainer = _trainer("dpo", tokenizer, records, scratch)
    row = trainer.train_dataset[0]
    ours = prefs.collate_pairs(tokenizer, records[:1])
    mask = ours["completion_mask"][0].bool()
    assert row["chosen_ids"] == ours["input_ids"][0][mask].tolist()
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id
