"""Full fine-tuning and catastrophic forgetting: the task skill and retained skills, tracked over training.

A `ForgettingRun` is one SFT run (full fine-tuning or any peft method) measured every few steps by a
`Snapshot`: held-out task accuracy in the chat form (what we teach), the same on a validation split (what
early stopping may look at), raw-form accuracy on the same questions (the pretraining skill we want to
keep) and perplexity on held-out pretraining text. The remedies for forgetting are arguments of one
function, `train_tracked`: a lower `learning_rate`, a `peft_config`, a `replay_fraction` of pretraining
text mixed into the data, and `early_stopped` picking the snapshot with the best validation score.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ftcourse.profiles import Profile, active_profile, resolve_dataset, run_sizes


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
    max_length: int = 128


RUN_SIZES: dict[str, ForgettingSizes] = {
    "cpu": ForgettingSizes(
        steps=30,
        batch_size=4,
        every=10,
        eval_per_family=5,
        heldout_docs=4,
        learning_rates=(3e-4, 1e-3, 3e-3),
        lora_learning_rate=3e-3,
        replay_fraction=0.25,
    ),
    "spark": ForgettingSizes(
        steps=400,
        batch_size=4,
        every=50,
        eval_per_family=100,
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
    """The fixed questions and text every snapshot measures: test, validation, raw form, perplexity."""

    test: tuple[Any, ...]
    validation: tuple[Any, ...]
    texts: tuple[str, ...]


def probe(
    sizes: ForgettingSizes, texts: Sequence[str] | None = None, profile: Profile | None = None
) -> Probe:
    """The Probe for `sizes`: held-out test and validation tasks and held-out pretraining text."""
    from ftcourse.evaluate import heldout_texts
    from ftcourse.toy.tasks import build_tasks

    texts = texts if texts is not None else heldout_texts(sizes.heldout_docs, profile)
    return Probe(
        tuple(build_tasks("test", sizes.eval_per_family)),
        tuple(build_tasks("validation", sizes.eval_per_family)),
        tuple(texts),
    )


@dataclass(frozen=True)
class Snapshot:
    """One measurement during training (fractions for accuracies)."""

    step: int
    task: float  # test tasks, chat form: the skill being taught
    validation: float  # validation tasks, chat form: what early stopping watches
    raw: float  # test tasks, raw pretraining form: the skill we want to keep
    perplexity: float  # held-out pretraining text
    task_hits: tuple[bool, ...] = field(default=(), repr=False)
    raw_hits: tuple[bool, ...] = field(default=(), repr=False)


def snapshot(model: Any, tokenizer: Any, questions: Probe, step: int = 0) -> Snapshot:
    """Measure `model` on the probe: one generate call for all three question sets, then perplexity."""
    from ftcourse import evaluate

    test, validation = list(questions.test), list(questions.validation)
    prompts = (
        [evaluate.chat_prompt(tokenizer, t) for t in test]
        + [evaluate.chat_prompt(tokenizer, t) for t in validation]
        + [t.raw_prompt for t in test]
    )
    replies = evaluate.generate(model, tokenizer, prompts, batch_size=len(prompts))
    n, m = len(test), len(validation)
    task = evaluate.score_replies(replies[:n], test)
    valid = evaluate.score_replies(replies[n : n + m], validation)
    raw = evaluate.score_replies(replies[n + m :], test)
    perplexity = evaluate.perplexity(model, tokenizer, questions.texts)
    return Snapshot(step, task.overall, valid.overall, raw.overall, perplexity, task.hits, raw.hits)


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
        """The first snapshot whose test task accuracy is at least `task`, or None."""
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
        max_length=sizes.max_length,
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
# Tables and the plot
# ---------------------------------------------------------------------------------------------------------


def remedies_table(runs: Sequence[ForgettingRun], start: Snapshot, early_stopping_of: str) -> Any:
    """One row per run (final snapshot), plus early stopping applied to run `early_stopping_of`."""
    import pandas as pd

    def row(label: str, run: ForgettingRun, shot: Snapshot) -> dict[str, Any]:
        return {
            "run": label,
            "lr": f"{run.learning_rate:.0e}",
            "step": shot.step,
            "task EM %": round(100 * shot.task),
            "validation EM %": round(100 * shot.validation),
            "raw EM %": round(100 * shot.raw),
            "raw change (points)": f"{100 * (shot.raw - start.raw):+.0f}",
            "perplexity": f"{shot.perplexity:.2f}",
        }

    rows = [row(run.name, run, run.final) for run in runs]
    chosen = next((run for run in runs if run.name == early_stopping_of), None)
    if chosen is None:
        raise ValueError(f"early_stopping_of={early_stopping_of!r} is not one of {[r.name for r in runs]}")
    rows.append(row(f"{chosen.name} + early stopping", chosen, chosen.early_stopped))
    base = {
        "run": "base model",
        "lr": "",
        "step": 0,
        "task EM %": round(100 * start.task),
        "validation EM %": round(100 * start.validation),
        "raw EM %": round(100 * start.raw),
        "raw change (points)": "",
        "perplexity": f"{start.perplexity:.2f}",
    }
    return pd.DataFrame([base, *rows]).set_index("run")


def tradeoff_plot(runs: Sequence[ForgettingRun]) -> Any:
    """Figure: task accuracy (x) against retained raw-form accuracy (y) over training, one path per run."""
    import matplotlib.pyplot as plt

    figure, (ax_raw, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4.2))
    for run in runs:
        xs = [100 * s.task for s in run.snapshots]
        (line,) = ax_raw.plot(xs, [100 * s.raw for s in run.snapshots], marker="o", label=run.name)
        ax_ppl.plot(xs, [s.perplexity for s in run.snapshots], marker="o", color=line.get_color())
        for s in run.snapshots[1:]:
            ax_raw.annotate(
                str(s.step),
                (100 * s.task, 100 * s.raw),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
                color=line.get_color(),
            )
    ax_raw.set_xlabel("task: held-out chat exact match (%)")
    ax_raw.set_ylabel("retained: raw-form exact match (%)")
    ax_ppl.set_xlabel("task: held-out chat exact match (%)")
    ax_ppl.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax_ppl.set_yscale("log")  # a run that forgets badly multiplies perplexity many times over
    ax_raw.legend(fontsize=8)
    for ax in (ax_raw, ax_ppl):
        ax.grid(alpha=0.3)
    figure.suptitle("Learning the task against keeping pretraining skills (labels: training step)")
    figure.tight_layout()
    return figure


def first_snapshots(runs: Sequence[ForgettingRun], task: float) -> dict[str, Snapshot | None]:
    """For each run, its first snapshot reaching test task accuracy `task` (None when it never does)."""
    return {run.name: run.first_reaching(task) for run in runs}
