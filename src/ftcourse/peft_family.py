"""The PEFT family side by side: one recipe per method, the same data and step budget, measured alike.

Each method is a `Method`: how to make the model trainable (a peft config, or a freezing rule for the
methods peft does not wrap), and the learning rate it trains at. `run_method` loads the profile's base
model, applies the method, trains it with `ftcourse.sft.train_sft`, and measures trainable parameters,
peak memory and time per step (with `StepMeter`), held-out exact match and retained capability.
`run_fresh` runs it in a fresh process, because a process keeps the memory it freed: the peak of the
second run in one process says little about that run.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ftcourse.profiles import Profile, active_profile, resolve_model
from ftcourse.sft import DEFAULT_TARGETS

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Modules a fresh worker process imports once, before any method runs: the import cost is paid once,
# while each run still starts from a process that has allocated nothing for a model yet.
PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "ftcourse.evaluate", "ftcourse.sft")


@dataclass(frozen=True)
class FamilySizes:
    """How big the comparison runs are on one profile: steps, batch, seeds and evaluation sets."""

    steps: int
    batch_size: int
    seeds: tuple[int, ...]  # every method trains once per seed
    eval_per_family: int  # held-out test tasks per family (chat form and raw form)
    heldout_docs: int  # documents for the retention perplexity
    virtual_tokens: int = 8  # prompt, prefix and P-tuning
    skip: dict[str, str] = field(default_factory=dict)  # method -> why it is not run on this profile


RUN_SIZES: dict[str, FamilySizes] = {
    "cpu": FamilySizes(steps=24, batch_size=8, seeds=(0, 1), eval_per_family=8, heldout_docs=8),
    "spark": FamilySizes(
        steps=300,
        batch_size=4,
        seeds=(0, 1),
        eval_per_family=100,
        heldout_docs=100,
        virtual_tokens=20,
        skip={
            "full fine-tuning": "8B parameters x 16 bytes (bf16 weights and gradients, fp32 Adam moments and "
            "master copy) is about 128 GB, the whole unified memory of a DGX Spark",
        },
    ),
}


def family_sizes(profile: Profile | None = None) -> FamilySizes:
    """The comparison's sizes for `profile` (the active one by default)."""
    profile = profile or active_profile()
    return RUN_SIZES[profile.name]


# ---------------------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its peft config (or freezing rule), learning rate, and the paper it is from."""

    name: str
    learning_rate: float
    cite: str  # bibliography key
    config: Callable[[FamilySizes, Profile], Any] | None = None  # -> peft config; None: no peft wrapper
    trainable: Callable[[str], bool] | None = None  # parameter name -> trainable, for methods without peft
    quantized: bool = False  # load the base in 4-bit NF4 (QLoRA)


def _lora(sizes: FamilySizes, profile: Profile, **kwargs: Any) -> Any:
    """The comparison's LoRA config: rank 8, alpha 16 on every linear layer of the blocks."""
    from ftcourse.sft import lora_config

    return lora_config(lora_rank=8, lora_alpha=16, **kwargs)


def _prompt_tuning(sizes: FamilySizes, profile: Profile) -> Any:
    """Soft prompt of `virtual_tokens` embeddings, started from the embeddings of a real instruction."""
    from peft import PromptTuningConfig, PromptTuningInit

    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=sizes.virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text="Answer the question with one word or number.",
        tokenizer_name_or_path=resolve_model("lora", profile),
    )


def _prefix_tuning(sizes: FamilySizes, profile: Profile) -> Any:
    """Trained keys and values for `virtual_tokens` positions in every layer."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=sizes.virtual_tokens)


def _p_tuning(sizes: FamilySizes, profile: Profile) -> Any:
    """Virtual-token embeddings produced by a small MLP prompt encoder."""
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=sizes.virtual_tokens, encoder_hidden_size=128)


def _ia3(sizes: FamilySizes, profile: Profile) -> Any:
    """Learned scaling of keys, values and the MLP's inner activations (IA3's three vectors per block)."""
    from peft import IA3Config

    return IA3Config(
        task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )


def _adalora(sizes: FamilySizes, profile: Profile) -> Any:
    """AdaLoRA from rank 12 down to an average of 8, pruned between 20% and 70% of the steps."""
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        task_type="CAUSAL_LM",
        init_r=12,
        target_r=8,
        lora_alpha=16,
        target_modules=list(DEFAULT_TARGETS),
        total_step=sizes.steps,
        tinit=max(1, sizes.steps // 5),
        tfinal=max(1, (3 * sizes.steps) // 10),
        deltaT=max(1, sizes.steps // 10),
    )


def _beft(sizes: FamilySizes, profile: Profile) -> Any:
    """A zero-initialised bias on every linear layer of the blocks, the only thing trained (BitFit for Llama)."""
    from peft import BeftConfig

    return BeftConfig(target_modules=list(DEFAULT_TARGETS))


def _vera(sizes: FamilySizes, profile: Profile) -> Any:
    """VeRA: frozen random rank-64 matrices shared by all layers, trained scaling vectors per layer."""
    from peft import VeraConfig

    return VeraConfig(task_type="CAUSAL_LM", r=64, target_modules=list(ATTENTION_TARGETS))


def _loha(sizes: FamilySizes, profile: Profile) -> Any:
    """LoHa: the update is the Hadamard product of two rank-4 products."""
    from peft import LoHaConfig

    return LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=list(DEFAULT_TARGETS))


METHODS: tuple[Method, ...] = (
    Method("full fine-tuning", 1e-3, "howard2018ulmfit", trainable=lambda name: True),
    Method("feature extraction", 3e-3, "howard2018ulmfit", trainable=lambda name: name.startswith("lm_head.")),
    Method("BitFit (as added biases)", 1e-2, "zaken2022bitfit", config=_beft),
    Method("prompt tuning", 3e-2, "lester2021prompt", config=_prompt_tuning),
    Method("prefix tuning", 1e-2, "li2021prefix", config=_prefix_tuning),
    Method("P-tuning", 1e-2, "liu2021ptuning", config=_p_tuning),
    Method("IA3", 3e-2, "liu2022ia3", config=_ia3),
    Method("AdaLoRA", 3e-3, "zhang2023adalora", config=_adalora),
    Method("LoRA", 3e-3, "hu2021lora", config=_lora),
    Method("DoRA", 3e-3, "liu2024dora", config=lambda sizes, profile: _lora(sizes, profile, use_dora=True)),
    Method("QLoRA", 3e-3, "dettmers2023qlora", config=_lora, quantized=True),
    Method("VeRA", 1e-2, "kopiczko2024vera", config=_vera),
    Method("LoHa", 3e-3, "hyeonwoo2022loha", config=_loha),
)


def method(name: str) -> Method:
    """The method called `name` in METHODS."""
    for candidate in METHODS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"no method called {name!r}; choose one of {[m.name for m in METHODS]}")


def load_4bit(profile: Profile | None = None) -> Any:
    """The profile's base model with every block linear in 4-bit NF4 (double quantization), as QLoRA loads it."""
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig

    from ftcourse.profiles import load_base

    profile = profile or active_profile()
    compute = torch.float32 if profile.device == "cpu" else torch.bfloat16  # CPU bf16 matmuls are slow
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # the library default is FP4
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = load_base(profile=profile, quantization_config=quantization)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weight in place the first time it
            # runs in eval mode without grad, and dequantizes it wrongly afterwards. Keep the plain path.
            module.support_avx512bf16_for_cpu = False
    return model


def prepare(method: Method, profile: Profile | None = None, sizes: FamilySizes | None = None) -> tuple[Any, Any]:
    """(model, peft_config) ready for `sft.train_sft`: the base loaded (4-bit for QLoRA) and frozen as needed."""
    from ftcourse.profiles import load_base

    profile = profile or active_profile()
    sizes = sizes or family_sizes(profile)
    model = load_4bit(profile) if method.quantized else load_base(profile=profile)
    if method.trainable is not None:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(method.trainable(name))
    return model, method.config(sizes, profile) if method.config else None


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as the numbers it stores, not its bytes."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()  # peft knows how many values a packed 4-bit tensor holds
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# ---------------------------------------------------------------------------------------------------------
# Measuring a run: memory, time per step
# ---------------------------------------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak), in KiB."""
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field_name} line; memory is measured on Linux only")
    return int(match.group(1))


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    return _status_kib("VmRSS") / 1024


def reset_peak_rss() -> None:
    """Reset this process's peak-resident-memory counter (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since start or the last `reset_peak_rss`, in MiB."""
    return _status_kib("VmHWM") / 1024


def step_meter() -> Any:
    """A Trainer callback timing each optimizer step and taking the memory at the start and peak of training."""
    import torch
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        """Seconds per step, and memory (MiB) when training starts and at its peak."""

        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            self.start_mib = self.peak_mib = 0.0
            self.cuda = torch.cuda.is_available()
            self._started = 0.0

        def _memory(self) -> float:
            return torch.cuda.memory_allocated() / 2**20 if self.cuda else rss_mib()

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_mib = self._memory()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
            return control

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()
            return control

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds.append(time.perf_counter() - self._started)
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else peak_rss_mib()
            return control

    return StepMeter()


def adalora_allocator() -> Any:
    """A Trainer callback calling AdaLoRA's `update_and_allocate` after every optimizer step (no one else does)."""
    from transformers import TrainerCallback

    class AdaLoraAllocator(TrainerCallback):
        """Prunes and reallocates AdaLoRA's ranks between optimizer.step() and zero_grad(), as the method needs."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            # The gradients are still there: AdaLoRA's importance scores are |weight * gradient|.
            # global_step counts finished steps, so it is this step's 0-based index, as peft expects.
            model.base_model.update_and_allocate(state.global_step)
            return control

    return AdaLoraAllocator()


# ---------------------------------------------------------------------------------------------------------
# One method, trained and measured
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodResult:
    """What one run of one method measured (or the error it stopped with)."""

    method: str
    seed: int
    trainable: int = 0
    total: int = 0
    learning_rate: float = 0.0
    start_mib: float = 0.0  # memory when training starts, above the process before loading (weights, state)
    peak_mib: float = 0.0  # peak memory during training, above the process before loading
    step_seconds: float = 0.0  # median seconds per optimizer step (first step excluded)
    final_loss: float = float("nan")
    chat_hits: tuple[bool, ...] = ()  # held-out test tasks, chat form
    raw_hits: tuple[bool, ...] = ()  # the same tasks in the raw pretraining form: retained skill
    perplexity: float = float("nan")  # held-out pretraining text
    error: str = ""  # "ExceptionType: message" when the run failed

    @property
    def ok(self) -> bool:
        """True when the run finished."""
        return not self.error

    @property
    def chat_accuracy(self) -> float:
        """Held-out exact match in the chat form (a fraction)."""
        return sum(self.chat_hits) / len(self.chat_hits) if self.chat_hits else float("nan")

    @property
    def raw_accuracy(self) -> float:
        """Held-out exact match in the raw form (a fraction)."""
        return sum(self.raw_hits) / len(self.raw_hits) if self.raw_hits else float("nan")


def training_records(sizes: FamilySizes, profile: Profile | None = None) -> Any:
    """The comparison's training set: exactly steps x batch chat records, so every run sees each once."""
    from ftcourse.data import load_records

    records = load_records("messages", "train", size=sizes.steps * sizes.batch_size, profile=profile)
    return records.select(range(min(len(records), sizes.steps * sizes.batch_size)))


def run_method(name: str, seed: int = 0, profile: Profile | None = None, sizes: FamilySizes | None = None) -> MethodResult:
    """Train method `name` once with `seed` and measure it; a failure comes back as the result's `error`."""
    from ftcourse import evaluate, sft
    from ftcourse.profiles import load_tokenizer
    from ftcourse.toy.tasks import build_tasks

    profile = profile or active_profile()
    sizes = sizes or family_sizes(profile)
    chosen = method(name)
    before = rss_mib()
    try:
        import torch

        torch.manual_seed(seed)  # prompt-tuning and VeRA draw their initial values when the config is applied
        tokenizer = load_tokenizer(profile=profile)
        model, peft_config = prepare(chosen, profile, sizes)
        meter = step_meter()
        callbacks = [meter] + ([adalora_allocator()] if name == "AdaLoRA" else [])
        run = sft.train_sft(
            model,
            tokenizer,
            training_records(sizes, profile),
            peft_config=peft_config,
            learning_rate=chosen.learning_rate,
            steps=sizes.steps,
            batch_size=sizes.batch_size,
            warmup_steps=max(1, sizes.steps // 10),
            callbacks=callbacks,
            copy_model=False,  # a fresh model per run: nothing to protect, and no second copy in memory
            seed=seed,
            profile=profile,
            progress=False,
        )
        tasks = build_tasks("test", sizes.eval_per_family)
        chat = evaluate.exact_match(run.model, tokenizer, tasks)
        raw = evaluate.exact_match(run.model, tokenizer, tasks, form="raw")
        perplexity = evaluate.perplexity(run.model, tokenizer, evaluate.heldout_texts(sizes.heldout_docs, profile))
    except Exception as error:  # the chapter shows a failing method's real error instead of hiding the row
        return MethodResult(name, seed, learning_rate=chosen.learning_rate, error=_error_text(error))
    trainable, total = trainable_parameters(run.model)
    steps = meter.step_seconds[1:] or meter.step_seconds  # the first step pays for lazy initialisation
    return MethodResult(
        name,
        seed,
        trainable,
        total,
        chosen.learning_rate,
        meter.start_mib - (0.0 if meter.cuda else before),
        meter.peak_mib - (0.0 if meter.cuda else before),
        statistics.median(steps) if steps else float("nan"),
        run.losses[-1][1] if run.losses else float("nan"),
        chat.hits,
        raw.hits,
        perplexity,
    )


def _error_text(error: BaseException) -> str:
    """'Type: message' of an exception, plus the innermost frame outside this module (file:line)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.endswith("peft_family.py")]
    where = ""
    if frames:
        frame = frames[-1]
        where = f" (raised in {'/'.join(frame.filename.split(os.sep)[-2:])}:{frame.lineno})"
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}{where}"


# ---------------------------------------------------------------------------------------------------------
# Fresh processes
# ---------------------------------------------------------------------------------------------------------


def _quiet_worker() -> None:
    """Send a worker's own stdout/stderr (library warnings, kernel notices) to a log file, not the notebook."""
    log = tempfile.NamedTemporaryFile(prefix="ftcourse-worker-", suffix=".log", delete=False)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = open(log.name, "w", buffering=1)  # noqa: SIM115 (lives as long as the worker)


def fresh_executor() -> ProcessPoolExecutor:
    """A pool whose every task runs in a new process forked from a server that has only imported libraries."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1, initializer=_quiet_worker)


def run_fresh(
    names: Sequence[str], seeds: Sequence[int] = (0,), profile: Profile | None = None, sizes: FamilySizes | None = None
) -> list[MethodResult]:
    """`run_method` for every name and seed, each in a fresh process, in order (methods outer, seeds inner)."""
    profile = profile or active_profile()
    sizes = sizes or family_sizes(profile)
    results = []
    with fresh_executor() as pool:
        for name in names:
            for seed in seeds:
                if name in sizes.skip:
                    results.append(MethodResult(name, seed, error=f"not run on this profile: {sizes.skip[name]}"))
                    continue
                results.append(pool.submit(run_method, name, seed, profile, sizes).result())
    return results

