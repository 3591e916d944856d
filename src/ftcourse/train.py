"""Pipelines from data to a trained, evaluated model: a reader's file, and the standard preference runs.

`ftcourse train METHOD --data FILE --out DIR`: read and convert the file (`formats.load_any`), report on it
(`data.data_report`; too much truncation stops here), split off a held-out part, fit-check the step
(`memory.fit_check`), train with checkpoints a second run resumes (`sft.train_sft` for sft/lora/qlora,
`prefs.preference_trainer` for dpo/simpo/orpo/kto), score the held-out rows before and after, save, and
print the `ftcourse export` command that comes next. `train` is the Python twin of the command.

The Part IV chapters' standard preference runs (`preference_run`) take the same path over the profile's
data: training records (`train_records`), a trainer whose max_length fits them, training, a held-out
evaluation of the policy and its SFT start on the test split of the same data (`evaluate_policy`), and a
cache. `measured`, `compare` and `verdict` read those evaluations item by item.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the package imports torch; `ftcourse --help` and the parser need none of it
    from ftcourse import data, formats
    from ftcourse.profiles import Profile

METHODS = ("sft", "lora", "qlora", "dpo", "simpo", "orpo", "kto")  # formats.METHOD_SCHEMAS has their data
PREFERENCE_METHODS = ("dpo", "simpo", "orpo", "kto")
FIT_METHODS = {"sft": "full", "qlora": "qlora"}  # memory.fit_check's name; every other method trains LoRA
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the shell reports Ctrl-C

# Run sizes per profile. The toy learns at ten times an 8B model's rate; minimal: the stand-ins' smoke test.
TRAIN_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "steps": 30,
        "batch_size": 8,
        "max_length": 256,
        "save_steps": 10,
        "sft_lr": 2e-3,
        "pref_lr": 3e-4,
    },
    "spark": {
        "steps": 500,
        "batch_size": 4,
        "max_length": 2048,
        "save_steps": 100,
        "sft_lr": 2e-4,
        "pref_lr": 5e-6,
    },  # fmt: skip
    "minimal": {
        "steps": 2,
        "batch_size": 2,
        "max_length": 256,
        "save_steps": 1,
        "sft_lr": 2e-4,
        "pref_lr": 5e-6,
    },
}


@dataclass
class TrainResult:
    """What `train` did: data report, fit-check, run, held-out comparison, saved model."""

    method: str
    out_dir: Path
    loaded: formats.Loaded
    report: data.DataReport
    fit: Any  # memory.MemoryEstimate
    recipe: dict[str, Any]
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: str | None = None  # the checkpoint this run started from
    train_rows: int = 0
    heldout_rows: int = 0
    before: list[float] = field(default_factory=list)  # held-out score per row, base model
    after: list[float] = field(default_factory=list)  # held-out score per row, trained model
    difference: Any = None  # evaluate.Difference, after - before, per held-out row
    verdict: Any = None  # verdicts.Verdict
    model_dir: Path | None = None
    export_command: str = ""
    model: Any = None  # the trained model (a PeftModel for every method but sft)

    def summary(self) -> str:
        """The run in a few lines of text."""
        from ftcourse.heldout import SCORE_WORDS

        start = f" (resumed from {Path(self.resumed_from).name})" if self.resumed_from else ""
        return "\n".join(
            [
                f"trained {self.method} for {self.recipe['steps']} steps{start} on {self.train_rows} rows; "
                f"{self.heldout_rows} held out",
                f"held-out score ({SCORE_WORDS[self.loaded.schema]}): {self.verdict.sentence}",
                f"saved: {self.model_dir}",
                f"next: {self.export_command}",
            ]
        )


def check_settings(method: str, steps: int | None, batch_size: int | None, test_fraction: float) -> None:
    """Refuse a method, step count, batch size or held-out share that cannot make a run, before any work."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(
                f"{name} must be a positive whole number, got {value!r}; leave it out for the profile's "
                "default (a run of 0 or -1 steps would silently train by epochs in TRL)"
            )
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if method == "kto" and batch_size == 1:
        raise ValueError(
            "kto needs batch_size of at least 2: its reference point pairs replies within a batch"
        )


def _tokenizer(model_ref: str, profile: Profile) -> Any:
    """The model's tokenizer, with a pad token, and a chat template TRL can mask the assistant turns of."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import get_training_chat_template

    from ftcourse.prefs import set_pad_token

    tokenizer = AutoTokenizer.from_pretrained(model_ref, local_files_only=not profile.uses_network)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False  # as profiles.load_tokenizer: ignored for BPE anyway
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{model_ref}: the tokenizer has no chat template; give an instruct/chat model, or set "
            "tokenizer.chat_template before training"
        )
    patched = get_training_chat_template(tokenizer)  # None when the template already has the markers
    if patched:
        tokenizer.chat_template = patched
    return set_pad_token(tokenizer)


def _fit(method: str, model_ref: str, sizes: Mapping[str, Any], profile: Profile) -> Any:
    """The memory fit-check of one training step of this run; raises ValueError when it does not fit."""
    from transformers import AutoConfig

    from ftcourse import memory, qlora

    config = AutoConfig.from_pretrained(model_ref, local_files_only=not profile.uses_network)
    estimate = memory.fit_check(
        config,
        FIT_METHODS.get(method, "lora"),
        objective=method if method in PREFERENCE_METHODS else "sft",
        seq_len=sizes["max_length"],
        batch_size=sizes["batch_size"],
        gradient_checkpointing=False,
        weights_dtype="fp32" if profile.dtype == "float32" else "bf16",
        device="spark" if profile.device == "cuda" else "cpu",
        device_gb=None if profile.device == "cuda" else qlora.device_memory_gb(profile),
    )
    if estimate.verdict == "does not fit":
        raise ValueError(
            f"fit-check: a {method} step of {model_ref} does not fit ({estimate.peak_gib:.1f} GiB needed, "
            f"{estimate.usable_bytes / 2**30:.1f} GiB usable). Use qlora, a smaller batch_size or "
            f"max_length, or a smaller model.\n{estimate.table()}"
        )
    return estimate


# --- the run ----------------------------------------------------------------------------------------------


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete `checkpoint-N` folder under `folder`, or None.

    The Trainer writes `trainer_state.json` last, after the weights, optimizer and RNG states: a folder
    without it is a save that Ctrl-C (or a crash) cut short, and resuming from it would fail.
    """
    if not folder.is_dir():
        return None
    complete = [
        path for path in folder.glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit() and (path / "trainer_state.json").is_file()
    ]  # fmt: skip
    return (
        str(max(complete, key=lambda path: int(path.name.removeprefix("checkpoint-")))) if complete else None
    )


def _train_sft(
    method: str, model: Any, tokenizer: Any, rows: list[dict], sizes: Mapping[str, Any], folder: Path,
    resume: str | None, profile: Profile, progress: bool, seed: int,
) -> tuple[Any, list[tuple[int, float]]]:  # fmt: skip
    """An SFT run (full for sft, LoRA for lora and qlora) with checkpoints in `folder`."""
    from datasets import Dataset

    from ftcourse import sft

    run = sft.train_sft(
        model,
        tokenizer,
        Dataset.from_list(rows),
        peft_config=None if method == "sft" else sft.lora_config(),
        learning_rate=sizes["learning_rate"],
        steps=sizes["steps"],
        batch_size=sizes["batch_size"],
        max_length=sizes["max_length"],
        logging_steps=max(1, min(5, sizes["steps"] // 2)),
        output_dir=folder,
        save_steps=sizes["save_steps"],
        resume_from_checkpoint=resume,
        copy_model=False,  # loaded for this run alone
        seed=seed,
        profile=profile,
        progress=progress,
    )
    return run.model, run.losses


def _train_preference(
    method: str, model: Any, tokenizer: Any, rows: list[dict], sizes: Mapping[str, Any], folder: Path,
    resume: str | None, profile: Profile, progress: bool, seed: int,
) -> tuple[Any, list[tuple[int, float]]]:  # fmt: skip
    """A DPO/SimPO/ORPO/KTO LoRA run through prefs.preference_trainer, with checkpoints in `folder`."""
    from datasets import Dataset

    from ftcourse import prefs

    trainer = prefs.preference_trainer(
        method,
        model,
        tokenizer,
        Dataset.from_list(rows),
        learning_rate=sizes["learning_rate"],
        steps=sizes["steps"],
        batch_size=sizes["batch_size"],
        max_length=sizes["max_length"],
        allow_truncation=True,  # `train` checked the rows against max_length, and stopped unless allowed
        logging_steps=max(1, min(5, sizes["steps"] // 2)),
        seed=seed,
        output_dir=str(folder),
        save_steps=sizes["save_steps"],
        progress=progress,
        profile=profile,
    )
    trainer.train(resume_from_checkpoint=resume)
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    trainer.model.eval()
    return trainer.model, losses


def _load_model(method: str, model_ref: str, profile: Profile, explicit: bool) -> Any:
    """The base model for `method`: 4-bit for qlora, else in the profile's dtype."""
    from ftcourse import profiles, qlora

    if method == "qlora":
        return qlora.load_qlora_model(profile, model=model_ref if explicit else None)
    if not explicit:
        return profiles.load_base(profile=profile)
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {"dtype": profile.torch_dtype, "local_files_only": not profile.uses_network}
    if profile.device == "cuda":
        options["device_map"] = "auto"
    return AutoModelForCausalLM.from_pretrained(model_ref, **options)


def _save(model: Any, tokenizer: Any, folder: Path, summary: Mapping[str, Any]) -> Path:
    """The trained model (an adapter, or the whole model for sft), tokenizer and run.json, written whole."""
    from ftcourse.atomic import atomic_folder

    with atomic_folder(folder) as stage:
        model.save_pretrained(str(stage), safe_serialization=True)
        tokenizer.save_pretrained(str(stage))
        (stage / "run.json").write_text(json.dumps(dict(summary), indent=1, default=str))
    return folder


def train(
    method: str,
    data_file: str | Path,
    *,
    out: str | Path,
    model: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    max_length: int | None = None,
    layout: str | None = None,
    columns: Mapping[str, str] | None = None,
    speakers: Mapping[str, str] | None = None,
    encoding: str | None = None,
    allow_truncation: bool = False,
    test_fraction: float = 0.2,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    profile: Profile | None = None,
    echo: Callable[[str], Any] = print,
) -> TrainResult:
    """Report -> fit-check -> train (resumable) -> held-out evaluation -> save; the twin of `ftcourse train`.

    Every check on the file, the settings and the memory runs before any training. `model` is a local
    folder (or a hub id on a profile with network); default the profile's model. `steps` etc. default to
    TRAIN_SIZES for the profile. With `resume`, a run finds the last checkpoint in `out/checkpoints`.
    """
    from ftcourse import data, evaluate, formats, verdicts
    from ftcourse.heldout import SCORE_WORDS, row_scores
    from ftcourse.profiles import active_profile, note_source, resolve_model, run_sizes, stay_offline

    check_settings(method, steps, batch_size, test_fraction)
    profile = profile or active_profile()
    stay_offline(profile)
    defaults = run_sizes(TRAIN_SIZES, profile)
    sizes = {
        "steps": steps or defaults["steps"],
        "batch_size": batch_size or defaults["batch_size"],
        "max_length": max_length or defaults["max_length"],
        "save_steps": min(defaults["save_steps"], steps or defaults["steps"]),
        "learning_rate": learning_rate or defaults["pref_lr" if method in PREFERENCE_METHODS else "sft_lr"],
    }
    model_ref = model or resolve_model("qlora" if method == "qlora" else "lora", profile)
    if model and not Path(model).expanduser().is_dir() and not profile.uses_network:
        raise ValueError(
            f"model={model!r} is not a local folder, and the {profile.name!r} profile never downloads: "
            "give a folder with config.json and safetensors weights, or FTCOURSE_PROFILE=spark for hub ids."
        )
    out = Path(out).expanduser()
    # 1. The file: read, convert, check every row, report; nothing past here runs on bad data.
    loaded = formats.load_any(
        data_file, layout=layout, columns=columns, speakers=speakers, encoding=encoding,
        method=method, collect=True, seed=seed,
    )  # fmt: skip
    tokenizer = _tokenizer(model_ref, profile)
    report = data.data_report(
        loaded.records, loaded.schema, tokenizer, sizes["max_length"], loaded.source, loaded.problems
    )
    echo(loaded.describe())
    echo(report.table())
    if loaded.problems:
        raise data.DataError(loaded.problems)
    data.check_truncation(report, allow=allow_truncation)
    rows = data.drop_duplicates(loaded.records)
    key = (lambda r: str(r["label"])) if loaded.schema == "feedback" else (lambda r: "all")
    train_rows, heldout = data.stratified_split(rows, key, test_fraction, seed)
    if not heldout or len(train_rows) < 2:
        raise ValueError(
            f"{loaded.source}: {len(rows)} distinct rows are too few to train on and hold some out "
            f"(test_fraction={test_fraction}); give at least 10 rows"
        )
    # 2. Memory, from the model's config alone.
    fit = _fit(method, model_ref, sizes, profile)
    echo(
        f"fit-check: {fit.verdict}, peak {fit.peak_gib:.2f} GiB of {fit.usable_bytes / 2**30:.1f} GiB usable"
    )
    # 3. Train, from the last checkpoint when there is one.
    base = _load_model(method, model_ref, profile, explicit=model is not None)
    note_source("train", loaded.source, loaded.schema)  # held-out rows of the same file: the source check
    note_source("score", loaded.source, SCORE_WORDS[loaded.schema])
    before = row_scores(base, tokenizer, heldout, loaded.schema)
    folder = out / "checkpoints"
    resumed = last_checkpoint(folder) if resume else None
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    if resumed:
        echo(f"resuming from {resumed}")
    run_one = _train_preference if method in PREFERENCE_METHODS else _train_sft
    trained, losses = run_one(
        method, base, tokenizer, train_rows, sizes, folder, resumed, profile, progress, seed
    )
    # 4. Held-out evaluation: the same rows, scored by the base and the trained model, paired per row.
    after = row_scores(trained, tokenizer, heldout, loaded.schema)
    difference = evaluate.paired_difference(after, before, unit="held-out row", seed=seed)
    said = verdicts.verdict(
        difference, "the trained model", "the base model", scale=1.0, unit_word="nats per token", digits=3
    )
    # 5. Save, and say what comes next.
    recipe = {"method": method, "model": model_ref, **sizes, "seed": seed, "layout": loaded.layout}
    summary = {"recipe": recipe, "losses": losses, "held_out": {"before": before, "after": after},
               "verdict": said.sentence, "resumed_from": resumed}  # fmt: skip
    saved = _save(trained, tokenizer, out / "model", summary)
    base_flag = "" if method == "sft" else f" --base {model_ref}"
    command = f"ftcourse export {saved} {out / 'export'}{base_flag}"
    result = TrainResult(
        method, out, loaded, report, fit, recipe, losses, resumed, len(train_rows), len(heldout), before,
        after, difference, said, saved, command, trained,
    )  # fmt: skip
    echo(result.summary())
    return result


# --- the book's standard preference runs: one recipe per profile, trained once and cached ------------------
#
# The same pipeline for the Part IV chapters: data (`train_records`) -> trainer (`prefs.preference_trainer`,
# which fits max_length to the data) -> train -> held-out evaluation of the policy and of its SFT start
# (`evaluate_policy`) -> cache. Chapters read a run's measurements item by item (`measured`) and compare
# two of them paired by item (`compare`, `verdict`).

# Sizes per profile. cpu: 320 training pairs (40 tasks per family, two kinds), 20 steps of 8 pairs, LoRA on
# the quick SFT; about 5-10 CPU-seconds a run. spark: hub preference data at real sizes on Llama-3.1-8B.
RUN_SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "train_per_family": 40,
        "steps": 20,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "eval_per_family": 25,
        "eval_pairs_per_family": 10,
    },
    "spark": {
        "train_per_family": 1000,
        "steps": 500,
        "batch_size": 4,
        "learning_rate": 5e-6,
        "eval_per_family": 200,
        "eval_pairs_per_family": 100,
    },
    # FTCOURSE_SIZES=minimal (the spark stand-ins in CI): every code path once, nothing measured
    "minimal": {
        "train_per_family": 4,
        "steps": 2,
        "batch_size": 2,
        "learning_rate": 5e-6,
        "eval_per_family": 1,
        "eval_pairs_per_family": 1,
    },
}
KTO_DESIRABLE_PER_UNDESIRABLE = 0.25  # task world: one thumbs-up per four thumbs-down
# Bumped when what a standard run trains on or measures changes outside its recipe: cached runs then retrain.
# 2: completions end at the end-of-turn token; period pairs; evaluation with the SFT start, item by item.
RUN_DATA_VERSION = 2
# A hub-trained run is scored on the test split of the dataset it trained on (issue 21); its cache key names
# that split, so runs cached when they were scored on the task world retrain. cpu keys are unchanged.
HUB_EVALUATION = "test split of the training dataset"
HUB_PAIRS = "held-out"  # a hub-trained run's one pair set: hub pairs have no kinds (correct, period, ...)
TASK_WORLD_MEASURES = ("hits", "styled")  # per question; they need the task world's answers
REPLY_TOKENS = 16  # greedy replies are cut here on the task world: a reply this long never ended its turn
HUB_REPLY_TOKENS = 256  # and on hub prompts, whose replies run to paragraphs (32 at minimal sizes)


def run_sizes(profile: Profile | None = None) -> dict[str, Any]:
    """The preference runs' sizes for `profile` (the "minimal" entry under FTCOURSE_SIZES=minimal)."""
    from ftcourse import profiles

    return dict(profiles.run_sizes(RUN_SIZES, profile or profiles.active_profile()))


def _schema(method: str) -> str:
    """The data schema a preference method trains on: feedback rows for KTO, pairs for the others."""
    return "feedback" if method == "kto" else "preference"


def _on_hub(profile: Profile) -> bool:
    """Whether `profile` trains the standard runs on hub datasets (spark) rather than the task world."""
    return profile.uses_network


@dataclass
class PreferenceRun:
    """A trained preference policy: the model (SFT start + adapter), its training log, cost and evaluation."""

    method: str
    recipe: dict[str, Any]
    model: Any = None  # a PeftModel; the adapter switched off gives the SFT start point
    history: list[dict[str, Any]] = field(default_factory=list)  # the Trainer's log (rewards, margins, ...)
    seconds: float = 0.0  # wall time of training
    cpu_seconds: float = 0.0  # process CPU time of training
    evaluation: dict[str, Any] = field(default_factory=dict)  # see evaluate_policy
    truncation: dict[str, Any] = field(default_factory=dict)  # what max_length cut (data.Truncation's fields)


def _refuse_task_world_options(
    profile: Profile, kinds: Sequence[str] | None, desirable_per_undesirable: float | None
) -> None:
    """On a hub profile pair kinds and the thumbs-up share select nothing: say so, never ignore them."""
    chosen = {"kinds": kinds, "desirable_per_undesirable": desirable_per_undesirable}
    given = [name for name, value in chosen.items() if value is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} cut the task world's pairs into training data; the {profile.name} profile "
            f"trains on its hub datasets as they are ({profile.datasets['preference']}, "
            f"{profile.datasets['feedback']}), so leave {' and '.join(given)} out there"
        )


def train_records(
    method: str,
    profile: Profile | None = None,
    per_family: int | None = None,
    desirable_per_undesirable: float | None = None,
    kinds: Sequence[str] | None = None,
) -> list[dict]:
    """The training data of the standard runs: preference pairs, or feedback cut from the same pairs (KTO).

    The pairs are of `kinds` (default `toy.preferences.TRAIN_KINDS`: content and the full-stop style).
    KTO's feedback keeps every rejected reply as a thumbs-down and `desirable_per_undesirable` (default
    KTO_DESIRABLE_PER_UNDESIRABLE) thumbs-up per thumbs-down. On the spark profile the hub's preference or
    feedback dataset is used as it is, as many rows as four task families give; `kinds` and
    `desirable_per_undesirable` then raise, since they would select nothing.
    """
    from ftcourse import data, profiles
    from ftcourse.toy import preferences as toy_prefs

    profile = profile or profiles.active_profile()
    per_family = per_family or run_sizes(profile)["train_per_family"]
    if _on_hub(profile):  # load_records logs the hub dataset as the training source
        _refuse_task_world_options(profile, kinds, desirable_per_undesirable)
        return list(data.load_records(_schema(method), "train", size=4 * per_family, profile=profile))
    profiles.note_source("train", profiles.TASK_WORLD, f"{method} training pairs")
    pairs = toy_prefs.preference_pairs("train", per_family, kinds=tuple(kinds or toy_prefs.TRAIN_KINDS))
    if method == "kto":
        ratio = (
            KTO_DESIRABLE_PER_UNDESIRABLE if desirable_per_undesirable is None else desirable_per_undesirable
        )
        return toy_prefs.feedback_records(pairs, ratio)
    return toy_prefs.preference_records(pairs)


def _prompt_key(prompt: Any) -> str:
    """A hashable form of a prompt (a string or a list of message dicts), to find rows of one prompt."""
    return prompt if isinstance(prompt, str) else json.dumps(list(prompt), sort_keys=True)


def feedback_pairs(rows: Sequence[Mapping[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """Pairs from feedback rows: the first liked and the first disliked reply of each prompt that has both.

    trl-lib/kto-mix-14k is argilla/dpo-mix-7k cut in two (each pair gives a liked and a disliked row of one
    prompt), so its test split pairs up again; prompts rated only one way are left out. At most `limit`.
    """
    first: dict[str, dict[bool, Mapping[str, Any]]] = {}
    for row in rows:
        first.setdefault(_prompt_key(row["prompt"]), {}).setdefault(bool(row["label"]), row)
    pairs = [
        {
            "prompt": sides[True]["prompt"],
            "chosen": sides[True]["completion"],
            "rejected": sides[False]["completion"],
        }
        for sides in first.values()
        if len(sides) == 2
    ]
    return pairs[:limit] if limit is not None else pairs


def _hub_heldout(method: str, per_family: int, profile: Profile) -> tuple[list[dict], list[dict]]:
    """(held-out pairs, held-out prompts' rows) of a hub-trained run: the test split of its training dataset.

    Pairs: the preference dataset's test pairs, or for KTO `feedback_pairs` of the feedback test rows.
    Prompts for greedy replies: the pairs' rows, or the feedback rows themselves when none pair up.
    """
    from ftcourse import data

    size = 4 * per_family
    if method != "kto":
        split = data.load_records("preference", "test", profile=profile)
        rows = [dict(r) for r in split.select(range(min(size, len(split))))]
        return rows, rows
    rows = [dict(r) for r in data.load_records("feedback", "test", profile=profile)]
    pairs = feedback_pairs(rows, size)
    return pairs, (pairs or rows[:size])


def heldout_pairs(
    per_family: int, kind: str | None = None, profile: Profile | None = None, method: str = "dpo"
) -> list[dict[str, Any]]:
    """Held-out (test split) preference records of the data a `method` run trains on.

    cpu: the task world's pairs of one kind, or of every HELDOUT_KINDS. A hub profile has no pair kinds:
    any `kind` reads the test split of the run's hub dataset, 4 x `per_family` pairs (for KTO, the
    feedback test rows paired by prompt, `feedback_pairs`); `heldout_note` says so once in a chapter.
    """
    from ftcourse import profiles
    from ftcourse.toy import preferences as toy_prefs

    profile = profile or profiles.active_profile()
    if _on_hub(profile):
        profiles.note_source("score", profile.datasets[_schema(method)], "held-out pairs")
        return _hub_heldout(method, per_family, profile)[0]
    profiles.note_source("score", profiles.TASK_WORLD, "held-out pairs")
    kinds = (kind,) if kind else toy_prefs.HELDOUT_KINDS
    return toy_prefs.preference_records(toy_prefs.preference_pairs("test", per_family, kinds=kinds))


def _turn(reply: str, tokenizer: Any) -> tuple[str, bool]:
    """The reply up to its end of turn, and whether it ended (within the generated tokens)."""
    ends = {tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|endoftext|>"} - {None}
    cut = min((reply.index(m) for m in ends if m in reply), default=None)
    return (reply, False) if cut is None else (reply[:cut], True)


def reply_lengths(tokenizer: Any, replies: Sequence[str], max_new_tokens: int = REPLY_TOKENS) -> list[int]:
    """Tokens of each generated reply before its end of turn (`max_new_tokens` where it never ended)."""
    lengths = []
    for reply in replies:
        text, ended = _turn(reply, tokenizer)
        lengths.append(
            len(tokenizer(text, add_special_tokens=False)["input_ids"]) if ended else max_new_tokens
        )
    return lengths


def _pair_measurements(peft_model: Any, tokenizer: Any, records: list[dict]) -> dict[str, Any]:
    """Per held-out pair: `pair_rankings` of the policy and of its start; and `pair_accuracies`."""
    from ftcourse import prefs

    if not records:
        empty = {f"{who}_{what}": [] for who in ("policy", "start") for what in ("sequence", "per_token")}
        return {"pairs": empty, "accuracy": {"implicit": None, "likelihood": None}}
    policy = prefs.pair_rankings(peft_model, tokenizer, records)
    with peft_model.disable_adapter():
        start = prefs.pair_rankings(peft_model, tokenizer, records)
    return {
        "pairs": {
            **{f"policy_{k}": v for k, v in policy.items()},
            **{f"start_{k}": v for k, v in start.items()},
        },
        "accuracy": prefs.pair_accuracies(peft_model, tokenizer, records),
    }


def _greedy(peft_model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> dict[str, list[str]]:
    """Greedy replies of the policy and of its start (the adapter off) to `prompts`."""
    from ftcourse import evaluate

    replies = {"policy": evaluate.generate(peft_model, tokenizer, prompts, max_new_tokens=max_new_tokens)}
    with peft_model.disable_adapter():
        replies["start"] = evaluate.generate(peft_model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return replies


def _evaluate_on_hub(peft_model: Any, tokenizer: Any, profile: Profile, method: str) -> dict[str, Any]:
    """evaluate_policy on a hub profile: the test split of the dataset the run trained on."""
    from ftcourse import profiles

    source = profile.datasets[_schema(method)]
    profiles.note_source("score", source, "held-out pairs and prompts")
    pairs, prompt_rows = _hub_heldout(method, run_sizes(profile)["eval_pairs_per_family"], profile)
    tokens = 32 if profile.minimal else HUB_REPLY_TOKENS
    prompts = [
        tokenizer.apply_chat_template(list(r["prompt"]), add_generation_prompt=True, tokenize=False)
        for r in prompt_rows
    ]
    replies = _greedy(peft_model, tokenizer, prompts, tokens)
    ranked = _pair_measurements(peft_model, tokenizer, pairs)
    return {
        "source": source,
        "split": "test",
        "n_pairs": len(pairs),
        "questions": {
            who: {"lengths": reply_lengths(tokenizer, said, tokens), "examples": said[:4]}
            for who, said in replies.items()
        },
        "pairs": {HUB_PAIRS: ranked["pairs"]},
        "pair_accuracy": {HUB_PAIRS: ranked["accuracy"]["implicit"]},
        "likelihood_accuracy": {HUB_PAIRS: ranked["accuracy"]["likelihood"]},
        # each held-out prompt and pair is its own unit of analysis, labelled by its place in the set
        "units": {
            "questions": [f"test/{i}" for i in range(len(prompt_rows))],
            "pairs": [f"test/{i}" for i in range(len(pairs))],
        },
    }


def evaluate_policy(
    peft_model: Any, tokenizer: Any, profile: Profile | None = None, method: str = "dpo"
) -> dict[str, Any]:
    """Held-out measurements of a trained policy and of its SFT start (the adapter off), item by item.

    cpu (the task world's test split): per question, exact match of the greedy reply, its length in
    tokens, and whether it is the preferred style (the right answer with a full stop, then the end of
    turn); per held-out pair of each kind in HELDOUT_KINDS, the `pair_rankings` of the policy and of the
    start, and the implicit-reward ranking (`pair_accuracies`). Lists are kept so that chapters can pair
    them by question or by pair.

    A hub profile scores the test split of the very dataset the run trained on: its pairs (UltraFeedback's;
    for KTO, kto-mix's liked and disliked reply to one prompt, `feedback_pairs`) are ranked the same way
    under the single kind HUB_PAIRS, and greedy replies to the same prompts give the lengths (at most
    HUB_REPLY_TOKENS tokens). Exact match and the full-stop style need the task world's answers and are
    not measured there (`measured` returns no values; `heldout_note` says so).
    """
    from ftcourse import evaluate, profiles
    from ftcourse.toy import preferences as toy_prefs
    from ftcourse.toy.tasks import build_tasks

    profile = profile or profiles.active_profile()
    if _on_hub(profile):
        return _evaluate_on_hub(peft_model, tokenizer, profile, method)
    sizes = run_sizes(profile)
    tasks = build_tasks("test", sizes["eval_per_family"])
    replies = _greedy(
        peft_model, tokenizer, [evaluate.chat_prompt(tokenizer, t) for t in tasks], REPLY_TOKENS
    )
    measured_questions: dict[str, Any] = {}
    for who in ("policy", "start"):
        report = evaluate.score_replies(replies[who], tasks)
        measured_questions[who] = {
            "hits": list(report.hits),
            "by_family": report.by_family,
            "lengths": reply_lengths(tokenizer, replies[who]),
            "styled": [
                int(toy_prefs.styled_reply(r, t.answer)) for r, t in zip(replies[who], tasks, strict=True)
            ],
            "examples": replies[who][:4],
        }
    pairs: dict[str, dict[str, list[int]]] = {}
    accuracies = {}
    for kind in toy_prefs.HELDOUT_KINDS:
        records = heldout_pairs(sizes["eval_pairs_per_family"], kind, profile)
        ranked = _pair_measurements(peft_model, tokenizer, records)
        pairs[kind], accuracies[kind] = ranked["pairs"], ranked["accuracy"]
    policy = measured_questions["policy"]
    return {
        "exact_match": sum(policy["hits"]) / len(policy["hits"]),
        "by_family": policy["by_family"],
        "hits": policy["hits"],
        "questions": measured_questions,
        "pairs": pairs,
        "pair_accuracy": {kind: acc["implicit"] for kind, acc in accuracies.items()},
        "likelihood_accuracy": {kind: acc["likelihood"] for kind, acc in accuracies.items()},
    }


def heldout_units(
    kind: str | None = None, profile: Profile | None = None, per_family: int | None = None
) -> list[str]:
    """The unit label (the task's item) of each held-out question (`kind=None`) or pair of `kind`, in order.

    A test item can appear in several tasks (another phrasing): such tasks form one unit of analysis.
    `per_family` defaults to the standard runs' evaluation sizes. On a hub profile each held-out row is
    its own unit (its place in the held-out set), whatever the kind.
    """
    from ftcourse import profiles
    from ftcourse.toy import preferences as toy_prefs
    from ftcourse.toy.tasks import build_tasks

    profile = profile or profiles.active_profile()
    sizes = run_sizes(profile)
    if _on_hub(profile):
        return [f"test/{i}" for i in range(4 * (per_family or sizes["eval_pairs_per_family"]))]
    if kind is None:
        return [t.item for t in build_tasks("test", per_family or sizes["eval_per_family"])]
    pairs = toy_prefs.preference_pairs("test", per_family or sizes["eval_pairs_per_family"], kinds=(kind,))
    return [p.task.item for p in pairs]


def _pair_kind(run: PreferenceRun, kind: str) -> str:
    """The kind under which `run` stored pairs of `kind`: itself, or HUB_PAIRS for a hub-trained run."""
    pairs = run.evaluation["pairs"]
    return HUB_PAIRS if kind not in pairs and HUB_PAIRS in pairs else kind


def measured(run: PreferenceRun, what: str, kind: str | None = None, who: str = "policy") -> list[int]:
    """One held-out measurement of `run`, item by item: `who` is 'policy' or 'start' (the adapter off).

    With `kind=None`, per question: what = 'hits', 'styled' or 'lengths'. With a pair kind, per pair:
    what = 'sequence' or 'per_token' (see `pair_rankings`). A hub-trained run answers every pair kind
    with its held-out hub pairs, and 'hits' and 'styled' with no values: they are not measured there.
    """
    if kind is None:
        questions = run.evaluation["questions"][who]
        if what in TASK_WORLD_MEASURES and what not in questions:
            return []
        return list(questions[what])
    return list(run.evaluation["pairs"][_pair_kind(run, kind)][f"{who}_{what}"])


def _source(run: PreferenceRun) -> str:
    """The dataset whose test split `run` was scored on."""
    from ftcourse.profiles import TASK_WORLD

    return run.evaluation.get("source", TASK_WORLD)


def _units(run: PreferenceRun, kind: str | None) -> list[str]:
    """The unit of each of `run`'s values: stored with a hub evaluation, else the task world's items."""
    stored = run.evaluation.get("units")
    if stored is not None:
        return list(stored["questions" if kind is None else "pairs"])
    return heldout_units(kind)


def _side(side: tuple[Any, str]) -> list[PreferenceRun]:
    """The runs (seeds) standing for one side of a comparison."""
    return list(side[0]) if isinstance(side[0], (list, tuple)) else [side[0]]


def not_measured(a: tuple[Any, str], b: tuple[Any, str], what: str, kind: str | None = None) -> str:
    """Why `compare` has no difference for these two sides ('' when it has one)."""
    runs = _side(a) + _side(b)
    sources = list(dict.fromkeys(_source(r) for r in runs))
    if len(sources) > 1:
        return (
            f"not measured: the runs were scored on different held-out sets ({', '.join(sources)}), "
            "each the test split of the data it trained on"
        )
    if (
        kind is None
        and what in TASK_WORLD_MEASURES
        and any(what not in r.evaluation["questions"]["policy"] for r in runs)
    ):
        measure = "exact match" if what == "hits" else "the full-stop style"
        return (
            f"not measured: {measure} needs the task world's answers; these runs were scored on {sources[0]}"
        )
    if not all(measured(r, what, kind) for r in runs):
        return (
            f"not measured: the test split of {sources[0]} gave no held-out pairs "
            "(no prompt has both a liked and a disliked reply)"
        )
    return ""


def compare(
    a: tuple[PreferenceRun, str], b: tuple[PreferenceRun, str], what: str, kind: str | None = None
) -> Any:
    """A minus B on one held-out measurement, paired by item (seeds of a run list averaged per item first).

    `a` and `b` are (run, who) with who 'policy' or 'start'; a list of runs (seeds) may stand for a run.
    Returns `ftcourse.evaluate.Difference`, unit 'pair' or 'question'; None where the two sides share no
    measured items (`not_measured` says why: a hub run's exact match, runs scored on different data).
    """
    from ftcourse import evaluate

    if not_measured(a, b, what, kind):
        return None
    units = _units(_side(a)[0], kind)

    def pooled(side: tuple[Any, str]) -> tuple[list[float], list[str]]:
        runs = _side(side)
        values = [v for r in runs for v in measured(r, what, kind, side[1])]
        return values, units * len(runs)

    (values_a, units_a), (values_b, units_b) = pooled(a), pooled(b)
    if len(values_a) != len(values_b):  # unequal seed counts: compare item means
        mean_a, mean_b = (
            evaluate.question_means(values_a, units_a),
            evaluate.question_means(values_b, units_b),
        )
        values_a, values_b, units_a = list(mean_a.values()), [mean_b[k] for k in mean_a], list(mean_a)
    return evaluate.paired_difference(
        values_a, values_b, units_a, unit="question" if kind is None else "pair"
    )


def verdict(
    a: tuple[PreferenceRun, str],
    b: tuple[PreferenceRun, str],
    what: str,
    kind: str | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> Any:
    """`compare` in words (`verdicts.verdict`: points for shares, tokens for lengths); 'not measured' with
    the reason where the two sides share no measured items."""
    from ftcourse import verdicts

    difference = compare(a, b, what, kind)
    if difference is None:
        return verdicts.Verdict("not measured", not_measured(a, b, what, kind), None, *names)
    if what == "lengths":
        return verdicts.verdict(difference, *names, scale=1.0, unit_word="tokens", digits=1)
    return verdicts.verdict(difference, *names)


def heldout_note(runs: PreferenceRun | Sequence[PreferenceRun]) -> str:
    """One line for a chapter: what hub-trained `runs` were scored on ('' for runs of the task world).

    The chapters name the task world's measurements (exact match, full-stop replies, pair kinds). A run
    trained on hub data is scored on that dataset's test split instead; this says so, through
    `profiles.note_skip`, so that no task-world label is read as a hub score.
    """
    from ftcourse import profiles

    runs = [runs] if isinstance(runs, PreferenceRun) else list(runs)
    hub = {_source(r): r.evaluation for r in runs if HUB_PAIRS in r.evaluation["pairs"]}
    if not hub:
        return ""
    sets = "; ".join(
        f"{source}: {e['n_pairs']} test pairs"
        + ("" if e["n_pairs"] else " (no prompt has a liked and a disliked reply)")
        + f", greedy replies to {len(e['units']['questions'])} test prompts"
        for source, e in hub.items()
    )
    return profiles.note_skip(
        "the task world's measurements (exact match, full-stop replies, pair kinds)",
        f"Each run is scored on the test split of the dataset it trained on ({sets}). Hub pairs have no "
        "kinds, so every pair kind below reads those pairs; exact match and full-stop replies need the "
        "task world's answers and show as not measured.",
    )


def run_recipe(
    method: str, seed: int = 0, profile: Profile | None = None, **overrides: Any
) -> dict[str, Any]:
    """The full recipe of a standard run: sizes of the profile, the method's defaults, and any overrides.

    On a hub profile the recipe names the dataset it trains on instead of the task world's pair kinds.
    """
    from ftcourse import prefs, profiles
    from ftcourse.toy import preferences as toy_prefs

    profile = profile or profiles.active_profile()
    if method not in prefs.METHODS:
        raise ValueError(f"method must be one of {prefs.METHODS}, got {method!r}")
    recipe = {"method": method, "seed": seed, **run_sizes(profile), **prefs.METHOD_DEFAULTS[method]}
    if _on_hub(profile):
        _refuse_task_world_options(
            profile, overrides.get("kinds"), overrides.get("desirable_per_undesirable")
        )
        recipe["data"] = profile.datasets[_schema(method)]
        if method == "kto":
            recipe["kto_weights"] = None
    else:
        recipe["kinds"] = list(toy_prefs.TRAIN_KINDS)
        if method == "kto":
            recipe |= {"kto_weights": None, "desirable_per_undesirable": KTO_DESIRABLE_PER_UNDESIRABLE}
    unknown = [k for k in overrides if k not in recipe and k != "peft"]
    if unknown:
        raise ValueError(f"unknown recipe keys {unknown}; a {method} run has {sorted(recipe)}")
    recipe = {**recipe, "peft": "lora", **overrides}
    if method == "kto" and recipe["kto_weights"] is None:  # from the label ratio of the data it trains on
        records = _recipe_records(recipe, profile)
        recipe["kto_weights"] = list(prefs.kto_weights([r["label"] for r in records]))
    return recipe


def _recipe_records(recipe: Mapping[str, Any], profile: Profile) -> list[dict]:
    """The training records a recipe names."""
    return train_records(
        recipe["method"],
        profile,
        recipe["train_per_family"],
        recipe.get("desirable_per_undesirable"),
        recipe.get("kinds"),
    )


def _run_dir(recipe: dict[str, Any], profile: Profile) -> Path:
    """The cache folder of a standard run: keyed by its recipe, its SFT start and what it is scored on."""
    import hashlib

    from ftcourse import sft

    key: dict[str, Any] = {
        "recipe": recipe,
        "start": sft.quick_cache_dir(profile).name,
        "data": RUN_DATA_VERSION,
    }
    if _on_hub(profile):
        key["evaluation"] = HUB_EVALUATION
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return sft.cache_root() / f"prefs-{recipe['method']}-{profile.name}-{digest}"


def sft_start(profile: Profile | None = None) -> Any:
    """The quick SFT model with its LoRA merged in: where every preference run starts, and DPO's reference."""
    from ftcourse import sft

    model = sft.quick_sft(profile=profile).model.merge_and_unload()
    model.eval()
    return model


def preference_run(
    method: str, seed: int = 0, *, profile: Profile | None = None, load_model: bool = True, **overrides: Any
) -> PreferenceRun:
    """The standard run of `method` (recipe: `run_recipe`), trained once and then reloaded from the cache.

    data (`train_records`) -> trainer (`prefs.preference_trainer`, max_length fitted to the data) ->
    train -> `evaluate_policy` -> cache. The adapter, training log, timings, truncation summary and
    evaluation are cached under `_build/ftcourse-cache`, keyed by the recipe and the quick SFT start
    point. `load_model=False` returns the cached summary alone.
    """
    import tempfile
    import time

    from datasets import Dataset

    from ftcourse import prefs, profiles, sft

    profile = profile or profiles.active_profile()
    recipe = run_recipe(method, seed, profile, **overrides)
    folder = _run_dir(recipe, profile)
    tokenizer = profiles.load_tokenizer(profile=profile)
    if (folder / "run.json").is_file():
        saved = json.loads((folder / "run.json").read_text())
        # what a cached run trained on, as a fresh one logs it through train_records
        profiles.note_source(
            "train", profiles.training_source(_schema(method), profile), f"{method} run (cached)"
        )
        model = sft.load_adapter(sft_start(profile), folder) if load_model else None
        return PreferenceRun(
            method,
            recipe,
            model,
            saved["history"],
            saved["seconds"],
            saved["cpu_seconds"],
            saved["evaluation"],
            saved.get("truncation", {}),
        )
    start = sft_start(profile)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = prefs.preference_trainer(
            method,
            start,
            tokenizer,
            Dataset.from_list(_recipe_records(recipe, profile)),
            beta=recipe["beta"],
            gamma=recipe.get("gamma"),
            kto_weights=tuple(recipe.get("kto_weights") or (1, 1)),
            learning_rate=recipe["learning_rate"],
            steps=recipe["steps"],
            batch_size=recipe["batch_size"],
            seed=seed,
            output_dir=scratch,
            profile=profile,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model = trainer.model
    model.eval()
    run = PreferenceRun(
        method,
        recipe,
        model,
        list(trainer.state.log_history),
        wall,
        cpu,
        evaluate_policy(model, tokenizer, profile, method),
        dataclasses.asdict(trainer.truncation),
    )
    summary = {
        "recipe": run.recipe,
        "history": run.history,
        "seconds": run.seconds,
        "cpu_seconds": run.cpu_seconds,
        "evaluation": run.evaluation,
        "truncation": run.truncation,
    }
    sft.save_cached_adapter(run.model, summary, folder)
    return run


# --- the command line ---------------------------------------------------------------------------------------


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """`a=b` arguments as a dict."""
    pairs = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} takes NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def add_train_command(commands: Any) -> None:
    """The `ftcourse train` sub-command (registered in cli.SUBCOMMANDS)."""
    parser = commands.add_parser(
        "train", help="fine-tune on your own data file: report, fit-check, train, evaluate"
    )
    parser.add_argument("method", choices=METHODS, help="how to train")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="JSON, JSONL, CSV, TSV or Parquet file, or a saved datasets folder")  # fmt: skip
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder for checkpoints, the model and run.json"
    )
    parser.add_argument("--model", help="local model folder (default: the profile's model)")
    parser.add_argument("--steps", type=int, help="optimizer steps (a positive number)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--max-length", type=int, help="tokens per row; longer rows are cut (see the report)")
    parser.add_argument("--layout", help="override the detected layout (see ftcourse.formats.LAYOUTS)")
    parser.add_argument(
        "--columns", action="append", metavar="YOURS=OURS", help="rename a column; repeatable"
    )
    parser.add_argument("--speaker", action="append", metavar="NAME=ROLE", help="a ShareGPT speaker's role")
    parser.add_argument(
        "--encoding", help="text encoding when the file is not UTF-8 (e.g. cp1252, utf-16-le)"
    )
    parser.add_argument(
        "--allow-truncation", action="store_true",
        help="train even when more rows exceed --max-length than the report's limit allows",
    )  # fmt: skip
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="share of rows held out (default 0.2)"
    )
    parser.add_argument("--restart", action="store_true", help="ignore earlier checkpoints in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Run `train` from parsed arguments: 0 when it trained, 2 on bad input, 130 when interrupted."""
    try:
        columns, speakers = _pairs(args.columns, "--columns"), _pairs(args.speaker, "--speaker")
        train(
            args.method, args.data, out=args.out, model=args.model, steps=args.steps,
            batch_size=args.batch_size, learning_rate=args.learning_rate, max_length=args.max_length,
            layout=args.layout, columns=columns,
            speakers=speakers, encoding=args.encoding,
            allow_truncation=args.allow_truncation, test_fraction=args.test_fraction,
            resume=not args.restart, progress=not args.no_progress,
        )  # fmt: skip
    except (ValueError, OSError) as error:  # DataError and TruncationError are ValueErrors
        print(f"ftcourse train: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        folder = Path(args.out) / "checkpoints"
        kept = last_checkpoint(folder)
        where = f"the last checkpoint, {kept}, is kept" if kept else "no checkpoint was written yet"
        print(f"ftcourse train: interrupted; {where}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
