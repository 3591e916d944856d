"""The from-scratch preference losses against TRL 1.x on the same model and batch, and against hand-worked
cases.

Tolerance: 1e-5 absolute on losses and logged rewards. TRL computes log-probabilities with a chunked kernel
(DPO, KTO) and `selective_log_softmax` (CPO, ORPO) rather than a plain `log_softmax`, so the two sides agree
to float32 rounding, not bitwise.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from ftcourse import prefs, profiles
from ftcourse.toy import preferences as toy_prefs

ATOL = 1e-5


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
    log_z = math.log(sum(math.exp(0.01 * k) for k in range(11)))
    out = prefs.sequence_logprobs(ConstantLogits(), batch)
    # log p(token k) = 0.01 k - log Z, whatever came before it; only completion tokens count.
    expected_total = [0.01 * (6 + 7) - 2 * log_z, 0.01 * (9 + 8 + 10) - 3 * log_z]
    assert out.total.tolist() == pytest.approx(expected_total, abs=1e-6)
    assert out.n_tokens.tolist() == [2, 3]
    assert out.mean.tolist() == pytest.approx([expected_total[0] / 2, expected_total[1] / 3], abs=1e-6)
    # Every real token after the first (the prompt too, never the padding).
    expected_all = [0.01 * (4 + 5 + 6 + 7) - 4 * log_z, 0.01 * (2 + 9 + 8 + 10) - 4 * log_z]
    assert out.all_total.tolist() == pytest.approx(expected_all, abs=1e-6)
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
    assert out.total.item() == pytest.approx(expected, abs=1e-5)


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


def test_dpo_loss_by_hand():
    # c - c_ref = 0.5, r - r_ref = -0.5, so beta * (0.5 + 0.5) = 0.1 and the loss is log(1 + e^-0.1).
    out = prefs.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    )
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-7)  # a sign error gives +0.1
    assert out.chosen_rewards.item() == pytest.approx(0.05)
    assert out.rejected_rewards.item() == pytest.approx(-0.05)
    assert out.accuracy == 1.0
    assert out.metrics()["rewards/margins"] == pytest.approx(0.1)


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
    assert ours.loss.item() == pytest.approx(trl_loss, abs=ATOL)
    assert abs(ours.loss.item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    for key, value in ours.metrics().items():
        if key != "loss":
            assert value == pytest.approx(logged[key], abs=ATOL), key
    # Summed over completion tokens only: an unmasked prompt would change these by whole nats.
    assert chosen.total.mean().item() == pytest.approx(logged["logps/chosen"], abs=1e-4)
    assert rejected.total.mean().item() == pytest.approx(logged["logps/rejected"], abs=1e-4)


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


def test_simpo_loss_by_hand():
    # Averages -0.5 (chosen) and -1.0 (rejected): beta * 0.5 - gamma = 2 * 0.5 - 1 = 0, loss log 2.
    out = prefs.simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=1.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    out = prefs.simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=0.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)
    assert out.chosen_rewards.item() == pytest.approx(-1.0)


def test_simpo_matches_trl(tokenizer, pairs, scratch):
    trainer = _trainer("simpo", tokenizer, toy_prefs.preference_records(pairs[:4]), scratch, peft_config=None)
    raw, batch = _paired_batch(trainer, 4)
    with torch.no_grad():
        trl_loss, logged = trainer.get_batch_loss_metrics(trainer.model, raw)
        chosen, rejected = prefs.sequence_logprobs(trainer.model, batch).halves()
    ours = prefs.simpo_loss(chosen.mean, rejected.mean, beta=2.0, gamma=1.0)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=ATOL)
    for key, value in ours.metrics().items():
        if key != "loss":
            assert value == pytest.approx(logged[key], abs=ATOL), key
    # The pairs differ in length, so summed log-probs (no length normalisation) give another loss.
    assert not torch.equal(chosen.n_tokens, rejected.n_tokens)
    unnormalised = prefs.simpo_loss(chosen.total, rejected.total, beta=2.0, gamma=1.0)
    assert abs(unnormalised.loss.item() - trl_loss.item()) > 1e-2


def test_orpo_loss_by_hand():
    # p_w = e^-0.5, p_l = e^-1: log odds = log(p/(1-p)); the loss is nll - lam * log sigmoid(difference).
    p_w, p_l = math.exp(-0.5), math.exp(-1.0)
    log_odds = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    out = prefs.orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), nll=torch.tensor(2.0), lam=0.1)
    expected = 2.0 - 0.1 * math.log(1 / (1 + math.exp(-log_odds)))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.extra["log_odds_chosen"] == pytest.approx(log_odds, abs=1e-6)
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
    assert trl_like.loss.item() == pytest.approx(trl_loss.item(), abs=ATOL)
    assert trl_like.extra["nll_loss"] == pytest.approx(float(logged["nll_loss"]), abs=ATOL)
    assert trl_like.extra["log_odds_ratio"] == pytest.approx(float(logged["log_odds_ratio"]), abs=ATOL)
    assert trl_like.metrics()["rewards/margins"] == pytest.approx(float(logged["rewards/margins"]), abs=ATOL)
    # Pinned: TRL's NLL covers the prompt; the paper's (completion only) is a different number.
    paper = prefs.orpo_loss(chosen.mean, rejected.mean, prefs.orpo_nll(chosen), lam=0.1)
    assert abs(paper.loss.item() - trl_loss.item()) > 1e-3


# --- KTO -------------------------------------------------------------------------------------------------


def test_kto_loss_by_hand():
    # Two desirable rows (log-ratios 1, 3), one undesirable (-2); z0 = max(0, mean(0.5, -1.5)) = 0.
    z0 = prefs.kto_reference_point(torch.tensor([0.5, -1.5]), torch.tensor([0.0, 0.0]))
    assert z0.item() == 0.0  # clamped at zero
    out = prefs.kto_loss(
        torch.tensor([1.0, 3.0, -2.0]),
        torch.zeros(3),
        torch.tensor([True, True, False]),
        z0,
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = ((1 - sig(0.5)) + (1 - sig(1.5)) + 2 * (1 - sig(0.5 * 2.0))) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-7)  # a sign error on the undesirable side fails
    assert out.metrics()["rewards/chosen"] == pytest.approx(1.0)
    assert out.metrics()["rewards/rejected"] == pytest.approx(-1.0)
    z0 = prefs.kto_reference_point(torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.5]))
    assert z0.item() == pytest.approx(1.0)


def test_kto_matches_trl(tokenizer, pairs, scratch):
    records = toy_prefs.feedback_records(pairs[:6], desirable_per_undesirable=0.5)
    trainer = _trainer("kto", tokenizer, records, scratch, kto_weights=(1.5, 1.0))
    _perturb_lora(trainer.model, seed=1)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    labels = torch.as_tensor(batch["label"], dtype=torch.bool)
    assert 0 < labels.sum() < len(labels), "the test batch needs both labels"
    kl_batch = {
        "input_ids": batch["KL_input_ids"],
        "attention_mask": batch["KL_attention_mask"],
        "completion_mask": batch["KL_completion_mask"],
    }
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
        policy = prefs.sequence_logprobs(trainer.model, batch).total
        policy_kl = prefs.sequence_logprobs(trainer.model, kl_batch).total
        with trainer.model.disable_adapter():
            ref = prefs.sequence_logprobs(trainer.model, batch).total
            ref_kl = prefs.sequence_logprobs(trainer.model, kl_batch).total
    z0 = prefs.kto_reference_point(policy_kl, ref_kl)
    ours = prefs.kto_loss(policy, ref, labels, z0, beta=0.1, desirable_weight=1.5, undesirable_weight=1.0)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert ours.loss.item() == pytest.approx(trl_loss, abs=ATOL)
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        assert ours.metrics()[key] == pytest.approx(logged[key], abs=ATOL), key


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


# --- GRPO ------------------------------------------------------------------------------------------------


def test_exact_match_reward_by_hand():
    completions = [
        [{"role": "assistant", "content": "22"}],
        [{"role": "assistant", "content": "23\nmore"}],
        "22",
    ]
    assert prefs.exact_match_reward(completions, ["22", "22", "22"]) == [1.0, 0.0, 1.0]


def test_grpo_trainer_steps_offline(tokenizer, scratch, no_network):
    from ftcourse.toy.tasks import build_tasks

    trainer = prefs.grpo_trainer(
        profiles.load_base(), tokenizer, build_tasks("train", 2), steps=1, batch_size=4, output_dir=scratch
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert no_network == []
    with pytest.raises(ValueError, match="multiple of num_generations"):
        prefs.grpo_trainer(None, tokenizer, [], batch_size=6, num_generations=4, output_dir=scratch)


def test_step_cost_in_a_forked_child(no_network):
    cost = prefs.step_cost("simpo", steps=1, batch_size=2)
    assert cost["peak_mib"] >= cost["setup_mib"] > 0
    assert cost["cpu_seconds_per_step"] > 0 and cost["trainable_parameters"] > 0
    assert no_network == []
    with pytest.raises(ValueError, match="method must be one of"):
        prefs.step_cost("ppo")


def test_run_sizes_and_train_records_under_minimal_sizes():
    from dataclasses import replace

    minimal = replace(profiles.PROFILES["cpu"], minimal=True)
    assert prefs.run_sizes(minimal) == prefs.RUN_SIZES["minimal"]
    assert set(prefs.RUN_SIZES["minimal"]) == set(prefs.RUN_SIZES["cpu"])
    per_family = prefs.RUN_SIZES["minimal"]["train_per_family"]
    # the default size follows the profile's table: a minimal run does not ask for the cpu profile's 320
    assert prefs.train_records("dpo", minimal) == prefs.train_records("dpo", per_family=per_family)
    assert prefs.run_recipe("dpo", profile=minimal)["steps"] == prefs.RUN_SIZES["minimal"]["steps"]


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
