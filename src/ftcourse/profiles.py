"""Profiles: one environment variable switches every chapter from the embedded model to real ones.

`FTCOURSE_PROFILE=cpu` (the default) uses the tiny model that ships inside the package and data the
package generates; it never touches the network. `FTCOURSE_PROFILE=spark` uses Llama 3.1 and hub
datasets at real sizes in bf16, for an NVIDIA DGX Spark. `FTCOURSE_MODEL` overrides the model id or path.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from ftcourse.toy import model_dir as toy_model_dir

PROFILE_ENV = "FTCOURSE_PROFILE"
MODEL_ENV = "FTCOURSE_MODEL"
DATASETS_ENV = "FTCOURSE_DATASETS"  # a folder of local copies: <folder>/<owner>/<name> per hub id
SIZES_ENV = "FTCOURSE_SIZES"  # "minimal": the profile's shared run sizes cut to a smoke test (CI, stand-ins)
MINIMAL_SIZES = {"eval_per_family": 4, "sft_examples": 64, "sft_steps": 4, "minimal": True}
SKIP_LOG_ENV = "FTCOURSE_SKIP_LOG"  # a file where note_skip appends what a run could not do here, and why
SOURCE_LOG_ENV = "FTCOURSE_SOURCE_LOG"  # a file where note_source appends what a run trained and scored on
SOURCE_USES = ("train", "score", "capability", "judge")
TASK_WORLD = "task world"  # the embedded model's generated tasks (ftcourse.toy.tasks): the cpu profile's data
DEVICE_ENV = "FTCOURSE_DEVICE"  # "cpu" runs the spark profile's code (bf16, hub layouts) without a GPU
ROLES = ("lora", "qlora")
T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    """Where models and data come from, and how big the runs are."""

    name: str
    summary: str
    models: Mapping[str, str]  # role -> hub id or local path
    dtype: str
    device: str  # "cpu", or "cuda" where weights are placed with device_map="auto"
    uses_network: bool
    datasets: Mapping[str, str] = field(default_factory=dict)  # schema -> hub dataset id
    eval_per_family: int = 50  # held-out tasks per family in every measurement
    sft_examples: int = 1200  # training examples in the quick SFT runs
    sft_steps: int = 150
    judge: str = "reward-model"  # win-rate judge: "reward-model" (trained on the task world) or "ollama:NAME"
    heldout_text: str = ""  # perplexity text: "" = fresh toy pretraining documents, else "hub_id:config"
    minimal: bool = False  # FTCOURSE_SIZES=minimal: every module's run sizes cut to a smoke test

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype models are loaded in."""
        return getattr(torch, self.dtype)


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        name="cpu",
        summary="embedded tiny Llama and generated data, on a plain CPU, offline",
        models={"lora": "embedded", "qlora": "embedded"},
        dtype="float32",
        device="cpu",
        uses_network=False,
    ),
    "spark": Profile(
        name="spark",
        summary="Llama 3.1 from the hub and hub datasets, bf16, on an NVIDIA DGX Spark",
        models={"lora": "meta-llama/Llama-3.1-8B-Instruct", "qlora": "meta-llama/Llama-3.1-70B-Instruct"},
        dtype="bfloat16",
        device="cuda",
        uses_network=True,
        datasets={
            "alpaca": "yahma/alpaca-cleaned",
            "messages": "HuggingFaceH4/no_robots",
            "preference": "trl-lib/ultrafeedback_binarized",
            "feedback": "trl-lib/kto-mix-14k",
        },
        eval_per_family=200,
        sft_examples=5000,
        sft_steps=500,
        judge="ollama:llama3.1:70b",
        heldout_text="Salesforce/wikitext:wikitext-2-raw-v1",
    ),
}


# What huggingface_hub, transformers, datasets and TRL read to stay off the network. TRL's trainers call
# huggingface_hub.send_telemetry (a HEAD request to huggingface.co) on construction; hub lookups for a
# local folder are skipped only in offline mode. The libraries read these variables once, at import.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def stay_offline(profile: Profile) -> bool:
    """For a profile that never uses the network, switch the HF libraries to offline mode; True if it did."""
    if profile.uses_network:
        return False
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # A library imported before this point has already read the variables: set its constants as well.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
        hub_constants.HF_HUB_DISABLE_TELEMETRY = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
    return True


def active_profile(environ: Mapping[str, str] | None = None) -> Profile:
    """The profile named by FTCOURSE_PROFILE (default `cpu`)."""
    environ = os.environ if environ is None else environ
    name = environ.get(PROFILE_ENV, "cpu").strip().lower() or "cpu"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r} is not a profile; choose one of {sorted(PROFILES)}.")
    if environ is os.environ:
        stay_offline(PROFILES[name])
    sizes = environ.get(SIZES_ENV, "").strip().lower()
    if sizes not in ("", "minimal"):
        raise ValueError(f"{SIZES_ENV}={sizes!r} is not a size setting; use 'minimal', or leave it unset.")
    if sizes == "minimal":
        return replace(active_profile({k: v for k, v in environ.items() if k != SIZES_ENV}), **MINIMAL_SIZES)
    device = environ.get(DEVICE_ENV, "").strip().lower()
    if device and device not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={device!r} is not a device; use 'cpu' or 'cuda', or leave it unset.")
    if device and device != PROFILES[name].device:
        # The embedded model on a GPU runs in bf16, as the real models do: the CUDA code paths get tested.
        dtype = "bfloat16" if device == "cuda" else PROFILES[name].dtype
        return replace(PROFILES[name], device=device, dtype=dtype)
    return PROFILES[name]


def run_sizes(table: Mapping[str, T], profile: Profile | None = None) -> T:
    """A module's sizes for the profile: `table["minimal"]` under FTCOURSE_SIZES=minimal, else by name."""
    profile = profile or active_profile()
    key = "minimal" if profile.minimal and "minimal" in table else profile.name
    if key not in table:
        raise ValueError(f"no run sizes for profile {key!r}; this table knows {sorted(table)}")
    return table[key]


def note_skip(what: str, why: str) -> str:
    """Say in one line that `what` cannot run here and why; log it for the test run; return the line."""
    line = f"Skipped here: {what}. {why}"
    log = os.environ.get(SKIP_LOG_ENV, "").strip()
    if log:
        with open(log, "a", encoding="utf-8") as handle:  # one JSON object a line; appends are atomic
            handle.write(json.dumps({"what": what, "why": why, "profile": active_profile().name}) + "\n")
    return line


_capability: list[str] = []  # the capability checks now open (capability_check), innermost last


@contextmanager
def capability_check(what: str) -> Iterator[None]:
    """Inside this block, scores are logged as a declared capability check, not as the chapter's score.

    A capability check (forgetting, perplexity on general text) may measure data the run never trained
    on; every other score must come from a held-out split of the training source (ftcourse.heldout).
    """
    _capability.append(what)
    try:
        yield
    finally:
        _capability.pop()


_judging: list[str] = []  # the judge trainings now open (judge_training)


@contextmanager
def judge_training(what: str) -> Iterator[None]:
    """Inside this block, training data is logged as a judge's ('judge'), not as what the chapter trains.

    A judge (a reward model that scores replies) is trained on its own data; the source check asks that a
    chapter score what its runs trained on, and a judge's data must not count as one of those.
    """
    _judging.append(what)
    try:
        yield
    finally:
        _judging.pop()


def note_source(use: str, source: str, what: str = "") -> None:
    """Log that this run trained (`use='train'`) or scored (`'score'`) on `source`, for the source check.

    A score inside `capability_check` is logged as 'capability'. Nothing is written unless
    FTCOURSE_SOURCE_LOG names a file (the chapter runner sets it for each chapter).
    """
    if use not in SOURCE_USES:
        raise ValueError(f"use must be one of {SOURCE_USES}, got {use!r}")
    log = os.environ.get(SOURCE_LOG_ENV, "").strip()
    if not log:
        return
    if use == "score" and _capability:
        use, what = "capability", what or _capability[-1]
    elif use == "train" and _judging:
        use, what = "judge", _judging[-1]
    with open(log, "a", encoding="utf-8") as handle:  # one JSON object a line; appends are atomic
        handle.write(json.dumps({"use": use, "source": source, "what": what}) + "\n")


def training_source(schema: str, profile: Profile | None = None) -> str:
    """Where the profile's records of `schema` come from: the task world on cpu, a hub id on spark."""
    profile = profile or active_profile()
    return profile.datasets[schema] if profile.uses_network else TASK_WORLD


def resolve_model(
    role: str = "lora", profile: Profile | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The model id or local folder for `role` ('lora' or 'qlora'), after the FTCOURSE_MODEL override."""
    environ = os.environ if environ is None else environ
    profile = profile or active_profile(environ)
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    override = os.path.expanduser(environ.get(MODEL_ENV, "").strip())
    model = override or profile.models[role]
    if model == "embedded":
        return str(toy_model_dir())
    if not profile.uses_network and not Path(model).is_dir():
        raise ValueError(
            f"{MODEL_ENV}={model!r} is not a local folder, and the {profile.name!r} profile never downloads. "
            f"Point {MODEL_ENV} at a folder with config.json and safetensors weights, "
            f"or set {PROFILE_ENV}=spark to allow hub downloads."
        )
    if Path(model).is_dir():
        check_model_folder(model, what=f"{MODEL_ENV}={model!r}" if override else repr(model))
    return model


def resolve_dataset(hub_id: str, environ: Mapping[str, str] | None = None) -> str:
    """The hub dataset id, or its local copy <FTCOURSE_DATASETS>/<hub id> when that variable is set."""
    environ = os.environ if environ is None else environ
    root = os.path.expanduser(environ.get(DATASETS_ENV, "").strip())
    if not root:
        return hub_id
    local = Path(root) / hub_id
    if not local.is_dir():
        raise ValueError(
            f"{DATASETS_ENV}={root!r} has no folder {hub_id!r} for the hub dataset {hub_id!r}: put a copy "
            f"there (ftcourse.toy.standin writes stand-ins), or unset {DATASETS_ENV} to download it."
        )
    return str(local)


def check_model_folder(folder: str | os.PathLike, what: str = "the model folder") -> Path:
    """The folder as a Path, checked to hold a loadable model; raises ValueError saying what is wrong."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"{what} is a PEFT adapter folder, not a model: point {MODEL_ENV} at the base model, and "
            f"load the adapter on top of it (peft.PeftModel.from_pretrained), or merge it first "
            f"(ftcourse export)."
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"{what} has no config.json: save the model there with save_pretrained(folder).")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what}: config.json is not valid JSON ({error}).") from error
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{what} has no *.safetensors weights: save the model with save_pretrained(folder).")
    for file in weights:
        try:
            with safe_open(file, framework="pt") as reader:
                list(reader.keys())
        except SafetensorError as error:  # empty, truncated or not safetensors at all
            raise ValueError(f"{what}: {file.name} is damaged ({error}); save the model again.") from error
    return folder


def _offline_kwargs(profile: Profile) -> dict[str, Any]:
    # local_files_only stops transformers from asking the hub, even for a missing file.
    return {} if profile.uses_network else {"local_files_only": True}


def load_tokenizer(role: str = "lora", profile: Profile | None = None) -> Any:
    """The tokenizer of the profile's model for `role`."""
    from transformers import AutoTokenizer

    profile = profile or active_profile()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(role, profile), **_offline_kwargs(profile))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and type(backend.model).__name__ == "BPE":
        # Llama 3.1 ships clean_up_tokenization_spaces=True; transformers ignores it for BPE tokenizers
        # (it would strip real spaces) and warns on every first decode. Same output, no warning.
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def load_base(role: str = "lora", profile: Profile | None = None, **kwargs: Any) -> Any:
    """The profile's base model for `role`, in the profile's dtype; extra kwargs go to from_pretrained."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    profile = profile or active_profile()
    if profile.name == "cpu" or profile.minimal:
        hf_logging.disable_progress_bar()  # a bar for loading a tiny model (or a stand-in) is noise
    options: dict[str, Any] = {"dtype": profile.torch_dtype, **_offline_kwargs(profile)}
    if profile.device == "cuda":
        options["device_map"] = "auto"
    options.update(kwargs)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(role, profile), **options)
    model.eval()
    return model


def model_label(role: str = "lora", profile: Profile | None = None) -> str:
    """The model for `role` as a page shows it: a hub id, a local folder's name, or the embedded model."""
    profile = profile or active_profile()
    model = resolve_model(role, profile)
    if profile.models[role] == "embedded" and not os.environ.get(MODEL_ENV, "").strip():
        return "embedded tiny Llama (`ftcourse/toy/weights`)"
    return Path(model).name if Path(model).is_dir() else model  # a folder's path would leak this machine's


def describe(profile: Profile | None = None) -> str:
    """A short Markdown summary of the active profile, for the first cell of every chapter."""
    profile = profile or active_profile()
    model = model_label("lora", profile)
    rows = [
        ("profile", f"`{profile.name}`: {profile.summary}"),
        ("model (LoRA chapters)", model),
        ("dtype", profile.dtype),
        ("network", "allowed" if profile.uses_network else "never used"),
        ("switch", f"set `{PROFILE_ENV}=spark` (and optionally `{MODEL_ENV}`) before starting Jupyter"),
    ]
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


try:  # at import: before a chapter's first transformers or TRL import reads the variables
    stay_offline(active_profile())
except ValueError:  # an unknown FTCOURSE_PROFILE: active_profile() says so when a chapter asks for it
    pass
