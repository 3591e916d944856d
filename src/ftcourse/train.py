"""From a reader's file to a trained, evaluated model: `ftcourse train METHOD --data FILE --out DIR`.

One pipeline over the concept modules: read and convert the file (`formats.load_any`), report on it
(`data.data_report`; too much truncation stops here), split off a held-out part, fit-check the step
(`memory.fit_check`), train with checkpoints a second run resumes (`sft.train_sft` for sft/lora/qlora,
`prefs.preference_trainer` for dpo/simpo/orpo/kto), score the held-out rows before and after, save, and
print the `ftcourse export` command that comes next. `train` is the Python twin of the command.
"""

from __future__ import annotations

import argparse
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


SCORE_WORDS = {
    "messages": "mean log-probability per token of the reply",
    "preference": "chosen minus rejected, mean log-probability per token",
    "feedback": "mean log-probability per token of the reply, negated for disliked replies",
}


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


# --- held-out scores --------------------------------------------------------------------------------------


def reply_logprob(
    model: Any, tokenizer: Any, prompt: Sequence[Mapping[str, str]], reply: Sequence[Any]
) -> float:
    """Mean log-probability per token of `reply` after `prompt` (chat turns), with the model's template."""
    import torch
    from trl.data_utils import common_prefix_length

    def ids(turns: Sequence[Any], generation: bool) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            [dict(t) for t in turns], tokenize=True, add_generation_prompt=generation, return_dict=True
        )
        return list(encoded["input_ids"])

    full = ids([*prompt, *reply], False)
    start = max(1, common_prefix_length(ids(prompt, True), full))  # the reply's first token
    device = getattr(model, "device", torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full], device=device)).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(full[1:], device=device)[:, None])[:, 0]
    return logprobs[start - 1 :].mean().item()


def heldout_scores(
    model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], schema: str
) -> list[float]:
    """One score per held-out row (SCORE_WORDS[schema]): higher means closer to what the data prefers."""
    was_training = model.training
    model.eval()
    scores = []
    for r in records:
        if schema == "messages":
            scores.append(reply_logprob(model, tokenizer, r["messages"][:-1], r["messages"][-1:]))
        elif schema == "preference":
            chosen = reply_logprob(model, tokenizer, r["prompt"], r["chosen"])
            scores.append(chosen - reply_logprob(model, tokenizer, r["prompt"], r["rejected"]))
        else:
            sign = 1.0 if r["label"] else -1.0
            scores.append(sign * reply_logprob(model, tokenizer, r["prompt"], r["completion"]))
    model.train(was_training)
    return scores


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
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import SaveStrategy

    from ftcourse import prefs, sft

    with sft._quiet(progress):  # TRL tokenizes the rows here, with a bar per pass
        trainer = prefs.preference_trainer(
            method,
            model,
            tokenizer,
            Dataset.from_list(rows),
            learning_rate=sizes["learning_rate"],
            steps=sizes["steps"],
            batch_size=sizes["batch_size"],
            max_length=sizes["max_length"],
            logging_steps=max(1, min(5, sizes["steps"] // 2)),
            seed=seed,
            output_dir=str(folder),
            profile=profile,
        )
    # preference_trainer builds runs the chapters cache whole: no checkpoints, no bar. This run keeps both.
    trainer.args.save_strategy = SaveStrategy.STEPS
    trainer.args.save_steps = sizes["save_steps"]
    if progress:
        trainer.add_callback(ProgressCallback)
    with sft._quiet(progress):
        trainer.train(resume_from_checkpoint=resume)
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    trainer.model.eval()
    return trainer.model, losses


def _load_model(method: str, model_ref: str, profile: Profile, explicit: bool) -> Any:
    """The base model for `method`: 4-bit for qlora, else in the profile's dtype."""
    from ftcourse import profiles, qlora

    if method == "qlora":
        if explicit:
            raise ValueError(
                "qlora loads the profile's model in 4-bit (qlora.load_qlora_model): point FTCOURSE_MODEL at "
                "your model folder instead of passing model="
            )
        return qlora.load_qlora_model(profile)
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
    from ftcourse.profiles import active_profile, resolve_model, run_sizes, stay_offline

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
    before = heldout_scores(base, tokenizer, heldout, loaded.schema)
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
    after = heldout_scores(trained, tokenizer, heldout, loaded.schema)
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
