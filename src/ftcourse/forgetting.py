"""Full fine-tuning and catastrophic forgetting: the task skill and retained skills, tracked over training.

A `ForgettingRun` is one SFT run (full fine-tuning or any peft method) measured every few steps by a
`Snapshot`: the held-out task score on the test split of what the run trains on (what we teach), the same
on other held-out rows (what early stopping may look at), raw-form accuracy on task-world questions (the
pretraining skill we want to keep) and perplexity on held-out pretraining text. The last two are declared
capability checks. On the cpu profile the task is the task world's, scored by exact match, and the raw
form asks the same questions; on spark the task score is the likelihood of the reference replies of
held-out rows of the hub dataset the run trains on (`ftcourse.heldout.score`). The remedies for
forgetting are arguments of one function, `train_tracked`: a lower `learning_rate`, a `peft_config`, a
`replay_fraction` of pretraining text mixed into the data, and `early_stopped` picking the snapshot with
the best validation score.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ftcourse.profiles import Profile, active_profile, resolve_dataset, run_sizes

if TYPE_CHECKING:  # imported where used: the module itself stays light
    from ftcourse.heldout import HeldOut

TASKS = "tasks"  # the schema of a held-out set scored by exact match (ftcourse.heldout.HeldOut.schema)


@dataclass(frozen=True)
class ForgettingSizes:
    """How long the forgetting runs are on one profile, and how often and how much they are measured."""

    steps: int
    batch_size: int
    every: int  # measure every this many steps
    eval_per_family: int  # tasks per family in each of the test and validation sets
    heldout_docs: int  # documents for the perplexity
    learning_rates: tuple[float, ...]  # the full fine-tuning sweep
    lora_learning_rate: float
    replay_fraction: float  # share of each batch that is pretraining text in the replay run
    # tokens per training row; on a hub profile the run measures it from its rows (sft.pick_max_length), and
    # this is the length the appendix's memory plan assumes
    max_length: int = 128
    reply_tokens: int = 16  # tokens generated per answer; a reply is scored up to its first end of turn


RUN_SIZES: dict[str, ForgettingSizes] = {
    # 60 steps: where full fine-tuning at the middle rate and LoRA reach comparable task accuracy; four
    # snapshots after step 0, so early stopping has a choice. 40 test questions (39 distinct items) and
    # 24 documents (about 2,600 tokens) are the units of the paired tests. The toy's answers are one
    # token: 3 reply tokens hold the answer, the end of the turn and a margin.
    "cpu": ForgettingSizes(
        steps=60,
        batch_size=4,
        every=15,
        eval_per_family=10,
        heldout_docs=24,
        learning_rates=(3e-4, 1e-3, 3e-3),
        lora_learning_rate=3e-3,
        replay_fraction=0.25,
        reply_tokens=3,
    ),
    # spark: test and validation rows both come from no_robots' test split (500 rows): 240 each.
    "spark": ForgettingSizes(
        steps=400,
        batch_size=4,
        every=50,
        eval_per_family=60,
        heldout_docs=100,
        learning_rates=(1e-5, 3e-5, 1e-4),
        lora_learning_rate=2e-4,
        replay_fraction=0.25,
        max_length=1024,
    ),
    # FTCOURSE_SIZES=minimal (CI under the spark stand-ins): every code path once, with the spark rates.
    "minimal": ForgettingSizes(
        steps=2,
        batch_size=2,
        every=1,
        eval_per_family=1,
        heldout_docs=2,
        learning_rates=(1e-5, 3e-5, 1e-4),
        lora_learning_rate=2e-4,
        replay_fraction=0.25,
    ),
}


def forgetting_sizes(profile: Profile | None = None) -> ForgettingSizes:
    """The forgetting runs' sizes for `profile` (the active one; 'minimal' under FTCOURSE_SIZES)."""
    return run_sizes(RUN_SIZES, profile or active_profile())


# ---------------------------------------------------------------------------------------------------------
# Data: chat examples as prompt/completion text, and pretraining text to replay
# ---------------------------------------------------------------------------------------------------------


def prompt_completion(record: dict[str, Any], tokenizer: Any) -> dict[str, str]:
    """A one-turn `messages` record as plain prompt/completion text (the chat template applied by hand)."""
    messages = record["messages"]
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(
            "record needs a user turn followed by an assistant turn, "
            f"got roles {[m['role'] for m in messages]}"
        )
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    # TRL appends the end-of-sequence token to a completion that lacks it; the chat turn ends with it.
    return {"prompt": prompt, "completion": messages[-1]["content"] + tokenizer.eos_token}


def replay_texts(n: int, lines_per_text: int = 4, profile: Profile | None = None) -> list[str]:
    """`n` pieces of general text to replay: the toy model's first documents, or the hub corpus (spark)."""
    from ftcourse.evaluate import _toy_recipe
    from ftcourse.toy.corpus import pretraining_documents

    profile = profile or active_profile()
    if profile.heldout_text:
        # A hub model's pretraining data is not public: replay the train split of the corpus whose test
        # split measures perplexity, so replayed and measured text never overlap.
        from datasets import load_dataset

        name, _, config = profile.heldout_text.partition(":")
        rows = load_dataset(resolve_dataset(name), config or None, split="train")["text"]
        return [text for text in rows if len(text.split()) >= 20][:n]
    recipe = _toy_recipe(profile)
    pieces: list[str] = []
    # The generator is deterministic and lazy: its first documents are the first the model was trained on.
    for document in pretraining_documents(recipe["n_docs"], seed=recipe["seed"]):
        lines = document.split("\n")
        pieces += ["\n".join(lines[i : i + lines_per_text]) for i in range(0, len(lines), lines_per_text)]
        if len(pieces) >= n:
            return pieces[:n]
    return pieces


def training_data(
    tokenizer: Any, sizes: ForgettingSizes, replay_fraction: float = 0.0, profile: Profile | None = None
) -> Any:
    """steps x batch prompt/completion rows: chat examples, `replay_fraction` of them pretraining text."""
    from datasets import Dataset

    from ftcourse.data import load_records

    if not 0.0 <= replay_fraction < 1.0:
        raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
    total = sizes.steps * sizes.batch_size
    n_replay = round(total * replay_fraction)
    chat = load_records("messages", "train", size=total, profile=profile)
    rows = [prompt_completion(chat[i], tokenizer) for i in range(min(len(chat), total - n_replay))]
    # Empty prompt: the loss covers the whole piece of text, as in pretraining.
    rows += [{"prompt": "", "completion": text} for text in replay_texts(n_replay, profile=profile)]
    random.Random(0).shuffle(rows)  # the same order for every run that uses the same fraction
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------------------
# Measuring during training
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """The fixed held-out sets every snapshot measures: test, validation, raw form, text for perplexity."""

    test: HeldOut  # the task: held-out rows of the source the run trains on
    validation: HeldOut  # the same source, other rows: what early stopping may look at
    raw: HeldOut  # a capability check: task-world questions in the raw pretraining form
    texts: tuple[str, ...]  # held-out general text (a capability check)
    reply_tokens: int = 16

    @property
    def items(self) -> tuple[str, ...]:
        """The unit of each test question: its family and item (rephrasings of one item share a label)."""
        return units(self.test)

    @property
    def raw_items(self) -> tuple[str, ...]:
        """The unit of each raw-form question (the test questions' own on the cpu profile)."""
        return units(self.raw)


def units(held: HeldOut) -> tuple[str, ...]:
    """One label per row of a held-out set: family/item for tasks, so rephrasings share one; else per row."""
    if held.schema == TASKS:
        return tuple(f"{task.family}/{task.item or task.prompt}" for task in held.rows)
    return tuple(f"{row.get('category') or held.schema}/{i}" for i, row in enumerate(held.rows))


def probe(
    sizes: ForgettingSizes, texts: Sequence[str] | None = None, profile: Profile | None = None
) -> Probe:
    """The Probe for `sizes`: held-out rows of the training source, raw-form questions, held-out text."""
    from ftcourse import heldout
    from ftcourse.evaluate import heldout_texts
    from ftcourse.toy.tasks import build_tasks

    profile = profile or active_profile()
    n = sizes.eval_per_family
    test = heldout.heldout_set("messages", n, profile)
    if test.schema == TASKS:  # the task world has a validation split of its own
        validation = replace(test, split="validation", rows=tuple(build_tasks("validation", n)))
    else:  # a hub dataset: the next rows of its test split, which no run trains on
        both = heldout.heldout_set("messages", 2 * n, profile)
        validation = replace(both, split="test (the rows after the test set)", rows=both.rows[len(test) :])
        if not validation.rows:
            raise ValueError(
                f"the test split of {test.source!r} has {len(test)} rows, all of them in the test set: "
                "none is left for validation. Lower eval_per_family in forgetting.RUN_SIZES."
            )
    texts = texts if texts is not None else heldout_texts(sizes.heldout_docs, profile)
    return Probe(test, validation, heldout.capability_tasks(n, profile), tuple(texts), sizes.reply_tokens)


@dataclass(frozen=True)
class HeldOutNLL:
    """Next-token NLL on held-out documents, kept per document and split at the line-break targets."""

    nll: tuple[float, ...]  # mean NLL per predicted token, one per document (nats)
    tokens: tuple[int, ...]  # tokens predicted, per document
    break_nll: tuple[float, ...]  # summed NLL of the targets that are a line break, per document
    breaks: tuple[int, ...]  # how many targets are a line break, per document
    breaks_as_eos: tuple[int, ...] = ()  # line-break targets where the model's first choice is EOS

    @property
    def perplexity(self) -> float:
        """exp of the token-weighted mean NLL: the perplexity of all the documents' tokens together."""
        return math.exp(self._total() / sum(self.tokens))

    def _total(self) -> float:
        return sum(nll * n for nll, n in zip(self.nll, self.tokens, strict=True))

    @property
    def at_breaks(self) -> float:
        """Mean NLL of the line-break targets over all documents (nan when there are none)."""
        return sum(self.break_nll) / sum(self.breaks) if sum(self.breaks) else float("nan")

    @property
    def elsewhere(self) -> float:
        """Mean NLL of every other target over all documents."""
        return (self._total() - sum(self.break_nll)) / (sum(self.tokens) - sum(self.breaks))

    def elsewhere_per_document(self) -> tuple[float, ...]:
        """Per document, the mean NLL of its targets that are not a line break."""
        return tuple(
            (nll * n - b) / (n - k)
            for nll, n, b, k in zip(self.nll, self.tokens, self.break_nll, self.breaks, strict=True)
        )

    @property
    def eos_at_breaks(self) -> float:
        """The share of line-break targets at which the model's most likely next token is EOS."""
        return sum(self.breaks_as_eos) / sum(self.breaks) if sum(self.breaks) else float("nan")

    def share_at_breaks(self, before: HeldOutNLL) -> float:
        """Of the rise in summed NLL since `before` (same documents), the share at line-break targets."""
        rise = self._total() - before._total()
        return (sum(self.break_nll) - sum(before.break_nll)) / rise if rise else float("nan")


def document_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 256, batch_size: int = 16
) -> HeldOutNLL:
    """Next-token NLL of `texts` per document, and the part of it at line-break targets."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence

    # The same tokenization, truncation and right padding as evaluate.token_nll, kept per document: the
    # document is the unit a paired test of perplexity resamples (its tokens are not independent).
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    break_id = newline[0] if len(newline) == 1 else None  # a tokenizer that merges line breaks: no split
    device = getattr(model, "device", torch.device("cpu"))
    means: list[float] = []
    counts: list[int] = []
    break_sums: list[float] = []
    break_counts: list[int] = []
    break_eos: list[int] = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            rows = [torch.tensor(ids) for ids in encoded[start : start + batch_size]]
            if any(len(row) < 2 for row in rows):
                raise ValueError("every held-out document needs at least two tokens to predict one")
            input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id).to(device)
            mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (B, T, V)
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1)
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )  # (B, T-1), 0 at padding
            n = (targets != -100).sum(dim=1)  # (B,)
            is_break = targets == (break_id if break_id is not None else -1)  # never true without an id
            means += (nll.sum(dim=1) / n).tolist()
            counts += n.tolist()
            break_sums += (nll * is_break).sum(dim=1).tolist()
            break_counts += is_break.sum(dim=1).tolist()
            # After a chat turn's answer comes the end-of-sequence token; after a raw answer, a line break
            first_choice = logits[:, :-1].argmax(dim=-1)  # (B, T-1)
            break_eos += (is_break & (first_choice == tokenizer.eos_token_id)).sum(dim=1).tolist()
    return HeldOutNLL(tuple(means), tuple(counts), tuple(break_sums), tuple(break_counts), tuple(break_eos))


@dataclass(frozen=True)
class Snapshot:
    """One measurement during training (fractions for accuracies; see `schema` for task and validation)."""

    step: int
    task: float  # test split of the training source: the skill being taught
    validation: float  # the same source's validation rows: what early stopping watches
    raw: float  # task-world questions, raw pretraining form: the skill we want to keep
    perplexity: float  # held-out pretraining text, all tokens together
    task_hits: tuple[float, ...] = field(default=(), repr=False)  # per test row: a hit, or a score
    raw_hits: tuple[bool, ...] = field(default=(), repr=False)
    validation_hits: tuple[float, ...] = field(default=(), repr=False)
    heldout: HeldOutNLL | None = field(default=None, repr=False)  # the perplexity, per document
    schema: str = TASKS  # how task and validation are scored: exact match, or heldout.SCORE_WORDS[schema]


def snapshot(model: Any, tokenizer: Any, questions: Probe, step: int = 0) -> Snapshot:
    """Measure `model` on the probe: task, validation and raw-form scores, then perplexity."""
    from ftcourse import evaluate, heldout
    from ftcourse.profiles import capability_check

    test, validation, raw_form = questions.test, questions.validation, questions.raw
    if test.schema == TASKS:  # exact match throughout: one generate call for all three question sets
        prompts = (
            [evaluate.chat_prompt(tokenizer, t) for t in test.rows]
            + [evaluate.chat_prompt(tokenizer, t) for t in validation.rows]
            + [t.raw_prompt for t in raw_form.rows]
        )
        replies = evaluate.generate(
            model, tokenizer, prompts, max_new_tokens=questions.reply_tokens, batch_size=len(prompts)
        )
        n, m = len(test), len(validation)
        task = evaluate.score_replies(replies[:n], list(test.rows))
        valid = evaluate.score_replies(replies[n : n + m], list(validation.rows))
        with capability_check("raw-form skill"):
            raw = evaluate.score_replies(replies[n + m :], list(raw_form.rows))
    else:  # hub rows: the likelihood of each reference reply; the raw-form questions still generate
        task = heldout.score(model, tokenizer, test)
        valid = heldout.score(model, tokenizer, validation)
        raw = heldout.score(  # a declared capability check (heldout.capability_tasks)
            model,
            tokenizer,
            raw_form,
            form="raw",
            max_new_tokens=questions.reply_tokens,
            batch_size=len(raw_form),
        )
    nll = document_nll(model, tokenizer, questions.texts)
    scores = (task.overall, valid.overall, raw.overall, nll.perplexity)
    return Snapshot(step, *scores, task.hits, raw.hits, valid.hits, nll, test.schema)


def score_text(value: float, schema: str = TASKS) -> str:
    """A task or validation score as text: a whole percentage of exact matches, or a log-probability."""
    return f"{value:.0%}" if schema == TASKS else f"{value:.3f}"


@dataclass
class ForgettingRun:
    """A tracked training run: its name, recipe, and the snapshots from step 0 to the last step."""

    name: str
    learning_rate: float
    snapshots: list[Snapshot]
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> Snapshot:
        """The snapshot after the last step."""
        return self.snapshots[-1]

    @property
    def early_stopped(self) -> Snapshot:
        """The snapshot early stopping keeps: best validation accuracy after step 0 (earliest on ties)."""
        trained = self.snapshots[1:] or self.snapshots
        return max(trained, key=lambda s: (s.validation, -s.step))

    def first_reaching(self, task: float) -> Snapshot | None:
        """The first snapshot whose test task score is at least `task`, or None."""
        return next((s for s in self.snapshots if s.task >= task), None)


def train_tracked(
    name: str,
    model: Any,
    tokenizer: Any,
    questions: Probe,
    start: Snapshot,
    *,
    learning_rate: float,
    peft_config: Any = None,
    replay_fraction: float = 0.0,
    sizes: ForgettingSizes | None = None,
    profile: Profile | None = None,
) -> ForgettingRun:
    """Fine-tune a copy of `model` (fully, or with `peft_config`); snapshot it every `sizes.every` steps."""
    from ftcourse import sft

    profile = profile or active_profile()
    sizes = sizes or forgetting_sizes(profile)
    tracker = sft.every_n_steps(sizes.every, lambda m, step: snapshot(m, tokenizer, questions, step))
    run = sft.train_sft(
        model,
        tokenizer,
        training_data(tokenizer, sizes, replay_fraction, profile),
        peft_config=peft_config,
        learning_rate=learning_rate,
        steps=sizes.steps,
        batch_size=sizes.batch_size,
        warmup_steps=max(1, sizes.steps // 10),
        # a hub dataset's conversations vary in length: measured from its rows, as every SFT run of the book
        max_length=None if profile.uses_network else sizes.max_length,
        assistant_only_loss=False,  # prompt/completion rows: TRL trains on the completion only
        callbacks=[tracker],
        profile=profile,
        progress=False,
    )
    snapshots = [start] + [value for _, value in tracker.results]
    return ForgettingRun(
        name, learning_rate, snapshots, run.trainable_parameters, run.total_parameters, run.seconds
    )


# ---------------------------------------------------------------------------------------------------------
# Verdicts: did a run learn, did it forget? Tests at the right unit, never thresholds
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Snapshot A against snapshot B on the same probe: three paired differences, each at its own unit."""

    task: Any  # evaluate.Difference of the task score (chat exact match per item, rephrasings averaged)
    raw: Any  # evaluate.Difference of raw-form exact match, per test item
    nll: Any  # evaluate.Difference of held-out NLL in nats per token, per document
    schema: str = TASKS  # how the task was scored (Snapshot.schema)

    def verdicts(self, a: str = "A", b: str = "B") -> dict[str, Any]:
        """The three comparisons in words (`ftcourse.verdicts.Verdict`): task, raw form, held-out NLL."""
        from ftcourse.heldout import verdict_units  # exact-match points, or nats per token on hub rows
        from ftcourse.verdicts import verdict

        task_units = verdict_units(self.schema)
        return {
            "task": verdict(self.task, a, b, **task_units),
            "raw": verdict(self.raw, a, b),
            # NLL is a loss: the model with the lower one predicts the held-out text better
            "nll": verdict(
                self.nll, a, b, higher_is_better=False, scale=1.0, unit_word="nats per token", digits=2
            ),
        }


def compare(a: Snapshot, b: Snapshot, questions: Probe) -> Comparison:
    """A - B paired by test item (task score and raw form) and by held-out document (NLL per token)."""
    from ftcourse.evaluate import paired_difference

    if a.heldout is None or b.heldout is None or not (a.task_hits and b.task_hits):
        raise ValueError("compare needs snapshots taken by `snapshot` (per-question hits, per-document NLL)")
    schema = questions.test.schema
    return Comparison(
        paired_difference(
            a.task_hits, b.task_hits, questions.items, unit="item" if schema == TASKS else "held-out row"
        ),
        paired_difference(a.raw_hits, b.raw_hits, questions.raw_items, unit="item"),
        # A document's tokens share its topic and its names: the document, not the token, is the unit.
        paired_difference(a.heldout.nll, b.heldout.nll, unit="document"),
        schema,
    )


def reading(comparison: Comparison) -> str:
    """What a trained snapshot (A) did against the base model (B), in words fixed by the three tests."""
    said = comparison.verdicts()
    learned = said["task"].outcome == "higher"
    forgot = said["raw"].outcome == "lower" or said["nll"].outcome == "higher"
    return {
        (True, True): "learns the task and pays for it",
        (True, False): "learns the task, with no detectable loss of the old skills",
        (False, True): "loses old skills without a detectable gain on the task",
        (False, False): "shows no detectable change on any of the three measures",
    }[(learned, forgot)]


# ---------------------------------------------------------------------------------------------------------
# Tables and the plot
# ---------------------------------------------------------------------------------------------------------


def remedies_table(
    runs: Sequence[ForgettingRun], start: Snapshot, early_stopping_of: str, questions: Probe | None = None
) -> Any:
    """One row per run (final snapshot), plus early stopping applied to run `early_stopping_of`.

    With `questions`, a last column reads each row against the base model from the three paired tests
    (`compare`, `reading`).
    """
    import pandas as pd

    task_column, validation_column, shown = _task_columns(start.schema)

    def row(label: str, run: ForgettingRun, shot: Snapshot) -> dict[str, Any]:
        values = {
            "run": label,
            "lr": f"{run.learning_rate:.0e}",
            "step": shot.step,
            task_column: shown(shot.task),
            validation_column: shown(shot.validation),
            "raw EM %": round(100 * shot.raw),
            "raw change (points)": f"{100 * (shot.raw - start.raw):+.0f}",
            "perplexity": f"{shot.perplexity:.2f}",
        }
        if questions is not None:
            values["against the base model (paired tests)"] = reading(compare(shot, start, questions))
        return values

    rows = [row(run.name, run, run.final) for run in runs]
    chosen = next((run for run in runs if run.name == early_stopping_of), None)
    if chosen is None:
        raise ValueError(f"early_stopping_of={early_stopping_of!r} is not one of {[r.name for r in runs]}")
    rows.append(row(f"{chosen.name} + early stopping", chosen, chosen.early_stopped))
    base = {
        "run": "base model",
        "lr": "",
        "step": 0,
        task_column: shown(start.task),
        validation_column: shown(start.validation),
        "raw EM %": round(100 * start.raw),
        "raw change (points)": "",
        "perplexity": f"{start.perplexity:.2f}",
    }
    return pd.DataFrame([base, *rows]).set_index("run")


def _task_columns(schema: str) -> tuple[str, str, Any]:
    """Table headers for the task and validation scores, and how a score is shown under them."""
    if schema == TASKS:
        return "task EM %", "validation EM %", lambda value: round(100 * value)
    return "task log-prob", "validation log-prob", lambda value: round(value, 3)


def comparison_table(comparisons: dict[str, Comparison]) -> Any:
    """One row per comparison: the verdict on task, raw form and held-out NLL, each with its interval."""
    import pandas as pd

    def cell(said: Any, difference: Any, scale: float, digits: int) -> str:
        low, high = (f"{scale * v:+.{digits}f}" for v in (difference.low, difference.high))
        return f"{said.outcome}: {scale * difference.estimate:+.{digits}f} [{low}, {high}]"

    rows = {}
    for label, comparison in comparisons.items():
        said = comparison.verdicts()
        task_cell = (
            ("task EM, points (per item)", cell(said["task"], comparison.task, 100, 0))
            if comparison.schema == TASKS
            else ("task log-prob, nats/token (per row)", cell(said["task"], comparison.task, 1, 3))
        )
        rows[label] = {
            task_cell[0]: task_cell[1],
            "raw-form EM, points (per item)": cell(said["raw"], comparison.raw, 100, 0),
            "held-out NLL, nats/token (per document)": cell(said["nll"], comparison.nll, 1, 2),
        }
    return pd.DataFrame(rows).T


def tradeoff_plot(runs: Sequence[ForgettingRun]) -> Any:
    """Figure: task accuracy (x) against retained raw-form accuracy (y) over training, one path per run."""
    import matplotlib.pyplot as plt

    exact = all(s.schema == TASKS for run in runs for s in run.snapshots)
    scale, x_label = (100, "task: held-out chat exact match (%)") if exact else (1, "task: reply log-prob")
    figure, (ax_raw, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4.2))
    for run in runs:
        xs = [scale * s.task for s in run.snapshots]
        (line,) = ax_raw.plot(xs, [100 * s.raw for s in run.snapshots], marker="o", label=run.name)
        ax_ppl.plot(xs, [s.perplexity for s in run.snapshots], marker="o", color=line.get_color())
        for s in run.snapshots[1:]:
            ax_raw.annotate(
                str(s.step),
                (scale * s.task, 100 * s.raw),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
                color=line.get_color(),
            )
    ax_raw.set_xlabel(x_label)
    ax_raw.set_ylabel("retained: raw-form exact match (%)")
    ax_ppl.set_xlabel(x_label)
    ax_ppl.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax_ppl.set_yscale("log")  # a run that forgets badly multiplies perplexity many times over
    ax_raw.legend(fontsize=8)
    for ax in (ax_raw, ax_ppl):
        ax.grid(alpha=0.3)
    figure.suptitle("Learning the task against keeping pretraining skills (labels: training step)")
    figure.tight_layout()
    return figure


def first_snapshots(runs: Sequence[ForgettingRun], task: float) -> dict[str, Snapshot | None]:
    """For each run, its first snapshot reaching test task score `task` (None when it never does)."""
    return {run.name: run.first_reaching(task) for run in runs}
