"""The PEFT family side by side: one recipe per method, the same data and step budget, measured alike.

Each method is a `Method`: how to make the model trainable (a peft config, or a freezing rule for the
methods peft does not wrap), and the learning rate it trains at. `run_method` loads the profile's base
model, applies the method, trains it with `ftcourse.sft.train_sft`, and measures trainable parameters,
peak memory and time per step (with `StepMeter`) and, when its sizes ask for it, its score on held-out rows
of the data it trains on (`ftcourse.heldout`: exact match on the task world's test questions on the cpu
profile) and retained capability (task-world questions in raw form, perplexity on held-out text: declared
capability checks). `run_fresh` runs it in a fresh process, because a process keeps the memory it freed:
the peak of the second run in one process says little about that run. A forked process inherits the
environment, so its training and scoring land in the same source log (`profiles.note_source`).

Two sizes per profile: `RUN_SIZES` for the cost table of every method (a few steps, no evaluation) and
`FOCUS_SIZES` for the quality comparison of `FOCUS_METHODS` (enough steps for LoRA to learn, several
seeds, tested per question with `pooled_difference`).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ftcourse.memory import peak_rss_mib, reset_peak_rss, rss_mib
from ftcourse.profiles import Profile, active_profile, resolve_model, run_sizes
from ftcourse.sft import DEFAULT_TARGETS

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class FamilySizes:
    """How big the comparison runs are on one profile: steps, batch, seeds and evaluation sets."""

    steps: int
    batch_size: int
    seeds: tuple[int, ...]  # every method trains once per seed
    eval_per_family: int  # held-out test tasks per family (chat and raw form); on spark, chat rows / 4
    heldout_docs: int  # documents for the retention perplexity
    virtual_tokens: int = 8  # prompt, prefix and P-tuning
    reply_tokens: int = 16  # tokens generated per answer; a reply is scored up to its first end of turn
    skip: dict[str, str] = field(default_factory=dict)  # method -> why it is not run on this profile
    measure_quality: bool = True  # False: train and measure cost only (no generation, no perplexity)


# The cost table: every method once, long enough for a steady time per step and the peak of training.
RUN_SIZES: dict[str, FamilySizes] = {
    "cpu": FamilySizes(
        steps=8, batch_size=3, seeds=(0,), eval_per_family=1, heldout_docs=1, measure_quality=False
    ),
    "spark": FamilySizes(
        steps=20, batch_size=4, seeds=(0,), eval_per_family=1, heldout_docs=1, virtual_tokens=20,
        measure_quality=False,
    ),
    # FTCOURSE_SIZES=minimal (CI under the spark stand-ins): every code path once, no result to read.
    "minimal": FamilySizes(
        steps=2, batch_size=2, seeds=(0,), eval_per_family=1, heldout_docs=2, virtual_tokens=4,
        measure_quality=False,
    ),
}  # fmt: skip

# The quality comparison: few methods, a budget where LoRA learns the chat format, several seeds, and
# enough test items for a paired test per item. On the cpu profile 60 steps of 4 examples take LoRA from
# the base model's 20% to well above it; 40 test questions are 39 distinct items. Full fine-tuning is the
# reference the others are usually quoted against.
FOCUS_METHODS: tuple[str, ...] = ("LoRA", "prompt tuning", "IA3", "full fine-tuning")
FOCUS_SIZES: dict[str, FamilySizes] = {
    "cpu": FamilySizes(
        steps=60, batch_size=4, seeds=(0, 1), eval_per_family=10, heldout_docs=8, reply_tokens=3
    ),
    "spark": FamilySizes(
        steps=300, batch_size=4, seeds=(0, 1), eval_per_family=100, heldout_docs=100, virtual_tokens=20
    ),
    "minimal": FamilySizes(
        steps=2, batch_size=2, seeds=(0,), eval_per_family=1, heldout_docs=2, virtual_tokens=4
    ),
}  # fmt: skip


def family_sizes(profile: Profile | None = None) -> FamilySizes:
    """The cost table's sizes for `profile` (the active one by default; 'minimal' under FTCOURSE_SIZES)."""
    return run_sizes(RUN_SIZES, profile or active_profile())


def focus_sizes(profile: Profile | None = None) -> FamilySizes:
    """The quality comparison's sizes for `profile` (the active one; 'minimal' under FTCOURSE_SIZES)."""
    return run_sizes(FOCUS_SIZES, profile or active_profile())


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

    return PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=sizes.virtual_tokens, encoder_hidden_size=128
    )


def _ia3(sizes: FamilySizes, profile: Profile) -> Any:
    """Learned scaling of keys, values and the MLP's inner activations (IA3's three vectors per block)."""
    from peft import IA3Config

    return IA3Config(
        task_type="CAUSAL_LM",
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
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
        tinit=sizes.steps // 5,  # peft requires tinit < total_step - tfinal: a budgeting phase of >= 1 step
        tfinal=(3 * sizes.steps) // 10,
        deltaT=max(1, sizes.steps // 10),
    )


def _beft(sizes: FamilySizes, profile: Profile) -> Any:
    """A zero-initialised bias on every block linear, the only thing trained (BitFit, for Llama)."""
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
    Method("feature extraction", 3e-3, "peters2019tune", trainable=lambda name: name.startswith("lm_head.")),
    Method("BitFit (as added biases)", 1e-2, "zaken2022bitfit", config=_beft),
    Method("prompt tuning", 3e-2, "lester2021prompt", config=_prompt_tuning),
    Method("prefix tuning", 1e-2, "li2021prefix", config=_prefix_tuning),
    Method("P-tuning", 1e-2, "liu2021ptuning", config=_p_tuning),
    Method("IA3", 1e-2, "liu2022ia3", config=_ia3),
    Method("AdaLoRA", 3e-3, "zhang2023adalora", config=_adalora),
    Method("LoRA", 3e-3, "hu2021lora", config=_lora),
    Method("DoRA", 3e-3, "liu2024dora", config=lambda sizes, profile: _lora(sizes, profile, use_dora=True)),
    Method("QLoRA", 3e-3, "dettmers2023qlora", config=_lora, quantized=True),
    Method("VeRA", 1e-2, "kopiczko2024vera", config=_vera),
    Method("LoHa", 3e-3, "hyeonwoo2022fedpara", config=_loha),
)


def method(name: str) -> Method:
    """The method called `name` in METHODS."""
    for candidate in METHODS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"no method called {name!r}; choose one of {[m.name for m in METHODS]}")


def load_4bit(profile: Profile | None = None) -> Any:
    """The profile's base model with every block linear in 4-bit NF4 (double quantization), as in QLoRA."""
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


def prepare(
    method: Method, profile: Profile | None = None, sizes: FamilySizes | None = None
) -> tuple[Any, Any]:
    """(model, peft_config) ready for `sft.train_sft`: the base (4-bit for QLoRA), frozen as needed."""
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


def trainable_at_scale(arch: Any, name: str, sizes: FamilySizes | None = None) -> int:
    """Trainable parameters of method `name` (as configured here) on a Llama-style `memory.Architecture`."""
    sizes = sizes or family_sizes(active_profile())
    shapes = arch.linear_shapes()  # name -> (out_features, in_features) in one decoder layer
    layers, n = arch.num_layers, sizes.virtual_tokens
    per_layer = {
        "full fine-tuning": None,
        "feature extraction": None,
        "BitFit (as added biases)": sum(out for out, _ in shapes.values()),  # one bias per output
        "prefix tuning": 2 * n * arch.kv_width,  # a key and a value vector per virtual token
        "IA3": 2 * arch.kv_width + arch.intermediate_size,  # scales keys, values, down_proj's input
        "LoRA": 8 * sum(out + inp for out, inp in shapes.values()),  # rank 8: A (r x in) and B (out x r)
    }
    if name == "full fine-tuning":
        return arch.total_params()
    if name == "feature extraction":
        return arch.vocab_size * arch.hidden_size  # the output head
    if name == "prompt tuning":
        return n * arch.hidden_size  # one input embedding per virtual token
    if name not in per_layer:
        raise ValueError(f"trainable_at_scale knows {sorted([*per_layer, 'prompt tuning'])}, not {name!r}")
    return layers * per_layer[name]


# ---------------------------------------------------------------------------------------------------------
# Measuring a run: memory, time per step
# ---------------------------------------------------------------------------------------------------------


def step_meter() -> Any:
    """A Trainer callback timing each optimizer step and taking memory at the start and peak of training."""
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
    """A Trainer callback calling AdaLoRA's `update_and_allocate` after each optimizer step."""
    from transformers import TrainerCallback

    class AdaLoraAllocator(TrainerCallback):
        """Prunes and reallocates AdaLoRA's ranks between optimizer.step() and zero_grad(), as it needs."""

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
    chat_hits: tuple[float, ...] = ()  # held-out rows of the training source: a hit, or a score per row
    raw_hits: tuple[bool, ...] = ()  # task-world test questions in the raw pretraining form: retained skill
    perplexity: float = float("nan")  # held-out pretraining text
    error: str = ""  # "ExceptionType: message" when the run failed
    cpu_seconds: float = 0.0  # CPU time of the whole run's process (load, train, evaluate)
    raw_hits_bare: tuple[bool, ...] = ()  # raw form again with the peft adapter switched off (peft only)

    @property
    def ok(self) -> bool:
        """True when the run finished."""
        return not self.error

    @property
    def chat_accuracy(self) -> float:
        """Held-out exact match in the chat form (a fraction; the mean score per row on hub rows)."""
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


def run_method(
    name: str,
    seed: int = 0,
    profile: Profile | None = None,
    sizes: FamilySizes | None = None,
    texts: Sequence[str] | None = None,
    learning_rate: float | None = None,
) -> MethodResult:
    """Train method `name` once with `seed` and measure it; a failure comes back as the result's `error`.

    `texts` is the held-out text for perplexity (built from the profile when not given); `learning_rate`
    replaces the method's own (`Method.learning_rate`) for this run.
    """
    from ftcourse import sft
    from ftcourse.profiles import load_tokenizer

    profile = profile or active_profile()
    sizes = sizes or family_sizes(profile)
    chosen = method(name)
    if learning_rate is not None:
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        chosen = replace(chosen, learning_rate=learning_rate)
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
        chat = raw = None
        perplexity, bare = float("nan"), ()
        if sizes.measure_quality:
            # peft's prompt methods ignore position ids by design, and warn so on every call.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Position ids are not supported", UserWarning)
                chat, raw, perplexity = measure(run.model, tokenizer, sizes, profile, texts)
                if hasattr(run.model, "disable_adapter"):  # the frozen base alone, for the raw form
                    with run.model.disable_adapter():
                        bare = raw_form_hits(run.model, tokenizer, sizes, profile)
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
        chat.hits if chat else (),
        raw.hits if raw else (),
        perplexity,
        cpu_seconds=_cpu_seconds(),
        raw_hits_bare=bare,
    )


def _cpu_seconds() -> float:
    """User plus system CPU seconds this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _WithoutVirtualTokens:
    """A prompt-tuned model whose logits drop the virtual-token positions peft puts in front."""

    def __init__(self, model: Any, n_virtual: int) -> None:
        self.model, self.n_virtual, self.device = model, n_virtual, model.device

    def __call__(self, **inputs: Any) -> Any:
        """The wrapped model's output with logits for the real tokens only, (B, T, V)."""
        output = self.model(**inputs)
        output.logits = output.logits[:, self.n_virtual :]
        return output

    @property
    def training(self) -> bool:
        """The wrapped model's mode (scorers switch to eval and back)."""
        return self.model.training

    def eval(self) -> _WithoutVirtualTokens:
        """Switch the wrapped model to eval mode."""
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> _WithoutVirtualTokens:
        """Switch the wrapped model to training mode (or eval, with mode=False)."""
        self.model.train(mode)
        return self


def measure(
    model: Any,
    tokenizer: Any,
    sizes: FamilySizes,
    profile: Profile | None = None,
    texts: Sequence[str] | None = None,
) -> tuple[Any, Any, float]:
    """(chat, raw) reports and perplexity: held-out rows of the training source, raw-form questions, text.

    chat: `heldout.score` on `heldout.heldout_set("messages")` (the task world's test questions, exact match,
    on the cpu profile). raw: the task world's test questions in the raw form, a declared capability check.
    """
    from ftcourse import evaluate, heldout
    from ftcourse.profiles import capability_check

    held = heldout.heldout_set("messages", sizes.eval_per_family, profile)
    questions = heldout.capability_tasks(sizes.eval_per_family, profile)
    config = getattr(model, "active_peft_config", None)
    scorer = model
    if config is not None and config.is_prompt_learning and config.peft_type.value != "PREFIX_TUNING":
        # Prompt and P-tuning prepend their virtual tokens to the input, so the logits are longer than
        # the text by that many positions; prefix tuning adds keys and values instead and needs no cut.
        scorer = _WithoutVirtualTokens(model, config.num_virtual_tokens)
    if held.schema == "tasks":  # one generate call for both forms: about what either form alone costs
        prompts = [evaluate.chat_prompt(tokenizer, t) for t in held.rows] + [
            t.raw_prompt for t in questions.rows
        ]
        replies = evaluate.generate(
            model, tokenizer, prompts, max_new_tokens=sizes.reply_tokens, batch_size=len(prompts)
        )
        chat = evaluate.score_replies(replies[: len(held)], list(held.rows))
        with capability_check("raw-form skill"):
            raw = evaluate.score_replies(replies[len(held) :], list(questions.rows))
    else:  # hub rows: the likelihood of each reference reply, read from the logits of the real tokens
        chat = heldout.score(scorer, tokenizer, held)
        raw = heldout.score(
            model,
            tokenizer,
            questions,
            form="raw",
            max_new_tokens=sizes.reply_tokens,
            batch_size=len(questions),
        )
    if texts is None:
        texts = evaluate.heldout_texts(sizes.heldout_docs, profile)
    perplexity = evaluate.perplexity(scorer, tokenizer, texts)
    return chat, raw, perplexity


def raw_form_hits(
    model: Any, tokenizer: Any, sizes: FamilySizes, profile: Profile | None = None
) -> tuple[bool, ...]:
    """Exact-match hits of `model` on the task world's test questions in the raw form (a capability check)."""
    from ftcourse import heldout

    questions = heldout.capability_tasks(sizes.eval_per_family, profile)
    report = heldout.score(
        model, tokenizer, questions, form="raw", max_new_tokens=sizes.reply_tokens, batch_size=len(questions)
    )
    return report.hits


def item_labels(sizes: FamilySizes, profile: Profile | None = None, form: str = "chat") -> tuple[str, ...]:
    """The unit of each held-out question: family and item for tasks (rephrasings share one), else its row.

    `form="chat"`: the held-out rows `measure` scores in chat form; `"raw"`: the raw-form questions.
    """
    from ftcourse import heldout
    from ftcourse.forgetting import units

    if form not in ("chat", "raw"):
        raise ValueError(f"form must be 'chat' or 'raw', got {form!r}")
    if form == "raw":
        return units(heldout.capability_tasks(sizes.eval_per_family, profile))
    return units(heldout.heldout_set("messages", sizes.eval_per_family, profile))


def _error_text(error: BaseException) -> str:
    """'Type: message' of an exception, plus the innermost frame outside this module (file:line)."""
    frames = [
        f for f in traceback.extract_tb(error.__traceback__) if not f.filename.endswith("peft_family.py")
    ]
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
    """Send a worker's own stdout/stderr (library warnings) to a log file instead of the notebook."""
    log = tempfile.NamedTemporaryFile(prefix="ftcourse-worker-", suffix=".log", delete=False)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = open(log.name, "w", buffering=1)  # noqa: SIM115 (lives as long as the worker)


def _worker(connection: Any, name: str, seed: int, profile: Profile, sizes: FamilySizes, texts: Any) -> None:
    """Body of a fresh process: run one method and send its result back through `connection`."""
    import torch

    # OpenMP's thread pool does not survive fork(): the parent trained (warm_up) with it, and a child that
    # enters a parallel region waits forever for threads it does not have. One thread keeps torch out.
    torch.set_num_threads(1)
    _quiet_worker()
    try:
        result = run_method(name, seed, profile, sizes, texts)
    except BaseException as error:  # noqa: BLE001 (anything, even a KeyboardInterrupt, goes back as a row)
        result = MethodResult(name, seed, error=_error_text(error))
    connection.send(result)
    connection.close()


def run_in_fresh_process(
    name: str,
    seed: int = 0,
    profile: Profile | None = None,
    sizes: FamilySizes | None = None,
    texts: Sequence[str] | None = None,
) -> MethodResult:
    """`run_method` in a new process forked from this one; call it before this process loads any model."""
    import torch

    profile = profile or active_profile()
    sizes = sizes or family_sizes(profile)
    if name in sizes.skip:
        return MethodResult(name, seed, error=f"not run on the {profile.name} profile: {sizes.skip[name]}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError(
            "CUDA is already initialised in this process, and a forked child cannot use it. "
            "Run the fresh-process measurements before anything touches the GPU (restart the kernel)."
        )
    # fork, not spawn: the child starts with the libraries this process has imported (no second import
    # bill) but with none of the memory a model or a training run allocates, which is what we measure.
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker, args=(sender, name, seed, profile, sizes, texts))
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:  # the child died without answering: killed for memory, or a crash in native code
        process.join()
        return MethodResult(name, seed, error=f"worker process died with exit code {process.exitcode}")
    process.join()
    return result


def preload() -> None:
    """Import the training libraries in this process, once, so that every forked run starts with them."""
    import logging

    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    # bitsandbytes logs, on import, that an optional hub kernel package is missing; it falls back to
    # its own CPU code, which is the code the QLoRA run uses. Loaded here, it counts in no run's memory.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        cpu_ops.setLevel(level)


def warm_up(profile: Profile | None = None) -> None:
    """Train and measure a throwaway one-layer Llama of width 16 once, so that forked runs start warm.

    The first training run in a process pays for lazy imports and first-call set-up in transformers,
    TRL, peft and datasets (about 0.3 CPU-s per run on the cpu profile). Paid once in the parent before
    forking, every child inherits it. What a child measures then drops by what that set-up allocates
    (about 12 MiB here, the same for every method); the model is too small for its freed memory to hide
    a part of a later run's peak.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftcourse import sft
    from ftcourse.profiles import load_tokenizer

    profile = profile or active_profile()
    if profile.device != "cpu":
        return  # a GPU run must not initialise CUDA before forking (see run_in_fresh_process)
    tokenizer = load_tokenizer(profile=profile)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tiny = FamilySizes(steps=1, batch_size=1, seeds=(0,), eval_per_family=1, heldout_docs=1, reply_tokens=2)
    model = LlamaForCausalLM(config).to(profile.torch_dtype).eval()
    run = sft.train_sft(
        model,
        tokenizer,
        training_records(tiny, profile),
        peft_config=_lora(tiny, profile),
        learning_rate=1e-3,
        steps=1,
        batch_size=1,
        warmup_steps=0,
        copy_model=False,
        profile=profile,
        progress=False,
    )
    measure(run.model, tokenizer, tiny, profile, ["warm up the perplexity path with a short text"])
    del run, model


def run_fresh(
    names: Sequence[str],
    profile: Profile | None = None,
    sizes: FamilySizes | None = None,
    texts: Sequence[str] | None = None,
) -> list[MethodResult]:
    """Every method in `names` with every seed, each run in a fresh process (methods outer, seeds inner)."""
    from ftcourse import evaluate

    profile = profile or active_profile()
    sizes = sizes or family_sizes(profile)
    texts = list(texts) if texts is not None else evaluate.heldout_texts(sizes.heldout_docs, profile)
    preload()
    warm_up(profile)
    # Python's collector, run in a child (accelerate calls gc.collect() after training), would walk
    # every object inherited from this process and write to its pages, which copies them: CPU time and
    # resident memory that belong to no run. Frozen objects are skipped; the parent unfreezes afterwards.
    gc.collect()
    gc.freeze()
    try:
        return [
            run_in_fresh_process(name, seed, profile, sizes, texts) for name in names for seed in sizes.seeds
        ]
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------------------------------------------------
# The table and the plot
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """The untrained base model on the same measurements: chat score, raw-form exact match, perplexity."""

    chat_hits: tuple[float, ...]
    raw_hits: tuple[bool, ...]
    perplexity: float
    items: tuple[str, ...] = ()  # the unit of each held-out chat row (`item_labels`)
    raw_items: tuple[str, ...] = ()  # the unit of each raw-form question; () means the same as `items`
    schema: str = "tasks"  # how chat rows are scored: exact match, or heldout.SCORE_WORDS[schema]

    def units(self, form: str = "chat") -> tuple[str, ...]:
        """The item labels of the chat rows or of the raw-form questions."""
        return (self.raw_items or self.items) if form == "raw" else self.items


BASE = "base model"  # the name `pooled_difference` gives the untrained model


def baseline(
    model: Any, tokenizer: Any, sizes: FamilySizes, texts: Sequence[str], profile: Profile | None = None
) -> Baseline:
    """The base model's Baseline on the comparison's held-out rows, raw-form questions and texts."""
    from ftcourse import heldout

    chat, raw, perplexity = measure(model, tokenizer, sizes, profile, texts)
    schema = heldout.heldout_set("messages", sizes.eval_per_family, profile).schema
    return Baseline(
        chat.hits,
        raw.hits,
        perplexity,
        item_labels(sizes, profile),
        item_labels(sizes, profile, "raw"),
        schema,
    )


def _share(hits: Sequence[float]) -> float:
    """The fraction of True in `hits` (the mean, for scores)."""
    return sum(hits) / len(hits)


def pooled_difference(
    results: Sequence[MethodResult], a: str, b: str, base: Baseline, form: str = "chat"
) -> Any:
    """`a` minus `b` in the chat score (or raw-form exact match) per item, seeds averaged per item first.

    `b` (or `a`) may be BASE, the untrained model. Only seeds where both methods finished are used, so the
    two sides average the same number of answers per item. Returns an `evaluate.Difference` (unit: item;
    a held-out row for chat rows scored by likelihood, see `Baseline.schema`).
    """
    from ftcourse.evaluate import paired_difference

    if form not in ("chat", "raw"):
        raise ValueError(f"form must be 'chat' or 'raw', got {form!r}")
    if not base.items:
        raise ValueError("the Baseline has no item labels: build it with peft_family.baseline")

    def by_seed(name: str) -> dict[int, tuple[float, ...]]:
        if name == BASE:
            return {}
        runs = {
            r.seed: (r.chat_hits if form == "chat" else r.raw_hits)
            for r in results
            if r.method == name and r.ok
        }
        if not runs:
            raise ValueError(f"no finished run of {name!r} among the results")
        return runs

    runs_a, runs_b = by_seed(a), by_seed(b)
    seeds = sorted(set(runs_a or runs_b) & set(runs_b or runs_a))
    base_hits = base.chat_hits if form == "chat" else base.raw_hits

    def pooled(runs: dict[int, tuple[float, ...]]) -> list[float]:
        return [hit for seed in seeds for hit in (runs[seed] if runs else base_hits)]

    unit = "item" if form == "raw" or base.schema == "tasks" else "held-out row"
    return paired_difference(pooled(runs_a), pooled(runs_b), list(base.units(form)) * len(seeds), unit=unit)


def cost_frame(results: Sequence[MethodResult]) -> Any:
    """The cost table: trainable parameters, memory and time per step of each run, or its error."""
    import pandas as pd

    table = []
    for r in results:
        if not r.ok:
            table.append({"method": r.method, "error": r.error})
            continue
        table.append(
            {
                "method": r.method,
                "trainable": f"{r.trainable:,}",
                "% of model": f"{100 * r.trainable / r.total:.3g}",
                "lr": f"{r.learning_rate:.0e}",
                "memory at start MiB": f"{r.start_mib:.0f}",
                "peak MiB": f"{r.peak_mib:.0f}",
                "ms/step": f"{1000 * r.step_seconds:.0f}",
                "error": "",
            }
        )
    return pd.DataFrame(table).fillna("").set_index("method")


def summary(results: Sequence[MethodResult], base: Baseline) -> list[dict[str, Any]]:
    """One row per method (in the order of `results`): its scores over seeds and its tests against the base.

    Exact match is given per seed and as the mean; `chat_vs_base` and `raw_vs_base` are paired tests per
    test item with the seeds averaged per item (`pooled_difference`), so the unit is the item, never the
    item-seed pair. Perplexity is the mean over seeds.
    """
    grouped: dict[str, list[MethodResult]] = {}
    for result in results:
        grouped.setdefault(result.method, []).append(result)
    rows = []
    for name, runs in grouped.items():
        done = [r for r in runs if r.ok]
        if not done:
            rows.append({"method": name, "error": runs[0].error, "seeds": len(runs)})
            continue
        first = done[0]
        per_seed = [r.chat_accuracy for r in done]
        rows.append(
            {
                "method": name,
                "trainable": first.trainable,
                "trainable_share": first.trainable / first.total,
                "learning_rate": first.learning_rate,
                "chat_per_seed": per_seed,  # in seed order
                "chat_mean": statistics.mean(per_seed),
                "raw_mean": statistics.mean(r.raw_accuracy for r in done),
                "chat_vs_base": pooled_difference(results, name, BASE, base, "chat"),
                "raw_vs_base": pooled_difference(results, name, BASE, base, "raw"),
                "seeds": len(done),
                "perplexity": statistics.mean(r.perplexity for r in done),
                "bare_is_base": all(r.raw_hits_bare == base.raw_hits for r in done if r.raw_hits_bare),
                "error": "" if len(done) == len(runs) else next(r.error for r in runs if not r.ok),
            }
        )
    return rows


def summary_frame(rows: Sequence[dict[str, Any]], base: Baseline) -> Any:
    """The summary as a formatted pandas DataFrame for the chapter (percentages, intervals per item)."""
    import pandas as pd

    from ftcourse.evaluate import percent

    if base.schema == "tasks":  # exact match: percentages and points
        chat_mean, chat_diff = "chat EM % (mean)", "chat vs base, points [95% CI]"

        def shown(value: float) -> str:
            return f"{100 * value:.0f}"

        def difference(d: Any) -> str:
            return percent(d.estimate, d.low, d.high)

    else:  # the likelihood of held-out reference replies: log-probabilities and nats per token
        chat_mean, chat_diff = "chat log-prob (mean)", "chat vs base, nats/token [95% CI]"

        def shown(value: float) -> str:
            return f"{value:.3f}"

        def difference(d: Any) -> str:
            return f"{d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"

    table = []
    for row in rows:
        if "trainable" not in row:
            table.append({"method": row["method"], "error": row["error"]})
            continue
        chat, raw = row["chat_vs_base"], row["raw_vs_base"]
        table.append(
            {
                "method": row["method"],
                "trainable": f"{row['trainable']:,}",
                "lr": f"{row['learning_rate']:.0e}",
                chat_mean: shown(row["chat_mean"]),
                "per seed": ", ".join(shown(value) for value in row["chat_per_seed"]),
                chat_diff: difference(chat),
                "p (chat)": f"{chat.p_value:.2g}",
                "raw EM % (mean)": f"{100 * row['raw_mean']:.0f}",
                "raw vs base, points [95% CI]": percent(raw.estimate, raw.low, raw.high),
                "perplexity": f"{row['perplexity']:.2f}",
                "error": row["error"],
            }
        )
    table.append(
        {
            "method": BASE,
            chat_mean: shown(_share(base.chat_hits)),
            "raw EM % (mean)": f"{100 * _share(base.raw_hits):.0f}",
            "perplexity": f"{base.perplexity:.2f}",
        }
    )
    return pd.DataFrame(table).fillna("").set_index("method")
