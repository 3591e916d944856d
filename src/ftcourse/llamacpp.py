"""llama.cpp through llama-cpp-python: quantize a GGUF file, run it, and compare it with transformers.

    quantize_gguf (Q4_K_M, ...) -> compare_with_llama_cpp -> check_comparison -> score_with_llama_cpp

score_with_llama_cpp scores a held-out set (ftcourse.heldout) with llama.cpp serving the file: exact match
of its replies on the task world's questions, the likelihood of the reference replies on chat records.

Quantization runs llama.cpp's own quantizer in a child process: Ctrl-C stops it at once (inside a
ctypes callback Python would swallow the KeyboardInterrupt and carry on), no partial file is left, and
llama.cpp's log becomes part of the error message when it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ftcourse.atomic import atomic_output
from ftcourse.gguf import PYTHON_GGUF_TYPES, ExportError

LLAMA_CPP_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36'
SMALL_MODEL_BYTES = 256 * 2**20  # below this, llama.cpp runs on one thread (see open_llama)
# llama.cpp types quantize_gguf accepts. The IQ types and Q2_K_S need an importance matrix (llama.cpp's
# llama-imatrix, run over calibration text), which this pipeline does not compute.
LLAMA_CPP_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "BF16",
)  # fmt: skip
# The child process: SIGINT back to its default, so Ctrl-C ends it at once instead of raising a
# KeyboardInterrupt inside llama.cpp's log callback, where ctypes would print and ignore it.
_QUANTIZE_CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


@dataclass(frozen=True)
class Tolerance:
    """What `ftcourse export --check` requires of a file: a logit bound and an argmax agreement floor."""

    max_abs_logit_diff: float | None  # None: no bound (4-bit files move logits by whole units)
    min_argmax_agreement: float

    def describe(self) -> str:
        """The tolerance in words, for help texts and reports."""
        if not self.max_abs_logit_diff:
            return f"argmax agreement >= {self.min_argmax_agreement:.0%}"
        return (
            f"max |dlogit| < {self.max_abs_logit_diff:g}, "
            f"argmax agreement >= {self.min_argmax_agreement:.0%} "
            f"(a flip between tokens under {2 * self.max_abs_logit_diff:g} apart counts as agreed)"
        )


# Set with room to spare from what the embedded model measured on --check's three prompts (26 positions):
# max |dlogit| f32 0.006, f16 0.008, BF16 0.07, Q8_0 0.16, Q6_K 0.44; argmax agreement 100% down to Q6_K,
# Q5_K_M 96%, Q4_K_M and Q4_K_S 96%, Q3_K_M 92%, Q3_K_S 81%, Q2_K 88%. A larger model may need its own.
CHECK_TOLERANCES = {
    "f32": Tolerance(0.05, 0.98),
    "f16": Tolerance(0.05, 0.98),
    "BF16": Tolerance(0.5, 0.95),
    "q8_0": Tolerance(1.0, 0.90),
    "Q8_0": Tolerance(1.0, 0.90),
    "Q6_K": Tolerance(None, 0.80),
    "Q5": Tolerance(None, 0.75),  # every Q5_* type
    "Q4": Tolerance(None, 0.70),
    "Q3": Tolerance(None, 0.50),
    "Q2": Tolerance(None, 0.40),
}


def check_tolerance(quant: str) -> Tolerance:
    """The --check tolerance for a GGUF type: its own entry, else that of its bit width (Q4_K_M -> Q4)."""
    return CHECK_TOLERANCES.get(quant) or CHECK_TOLERANCES[quant[:2]]


def check_quant_type(quant: str) -> str:
    """The canonical name of a GGUF type (f16, q8_0, Q4_K_M); raises ExportError for one we cannot write."""
    if not isinstance(quant, str) or not quant.strip():
        raise ExportError(f"A GGUF type must be a name such as f16, q8_0 or Q4_K_M, got {quant!r}.")
    if quant.lower() in PYTHON_GGUF_TYPES:
        return quant.lower()
    if quant.upper() in LLAMA_CPP_TYPES:
        return quant.upper()
    why = (
        " IQ types need an importance matrix (llama.cpp's llama-imatrix), which this export does not compute."
        if quant.upper().startswith("IQ") or quant.upper() == "Q2_K_S"
        else ""
    )
    raise ExportError(
        f"Unknown GGUF type {quant!r}.{why} Choose from {', '.join(PYTHON_GGUF_TYPES)} (our writer) or "
        f"{', '.join(LLAMA_CPP_TYPES)} (llama.cpp's quantizer)."
    )


def llama_cpp_available() -> bool:
    """True when llama-cpp-python can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _import_llama_cpp():
    """The llama_cpp module, or an ExportError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ExportError(
            f"llama-cpp-python is not installed. It builds from source (4-10 min on 2 cores):\n"
            f"    {LLAMA_CPP_INSTALL}"
        ) from error
    return llama_cpp


def open_llama(gguf_path: str | os.PathLike, **options: Any) -> Any:
    """A llama_cpp.Llama for the file, quiet, and on one thread when the model is small."""
    llama_cpp = _import_llama_cpp()
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ExportError(f"No GGUF file at {gguf_path}.")
    if gguf_path.stat().st_size < SMALL_MODEL_BYTES:
        # A few MiB of weights take well under a millisecond per token; a second thread costs more in
        # wake-ups and barriers than it saves, and on a busy CPU its spin-waits make a step 100x slower.
        options = {"n_threads": 1, "n_threads_batch": 1, **options}
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), verbose=False, **options)
    except ValueError as error:  # "Failed to load model from file"
        raise ExportError(f"llama.cpp cannot load {gguf_path} ({error}).") from error


def quantize_gguf(
    f16_path: str | os.PathLike,
    out_path: str | os.PathLike,
    quant: str = "Q4_K_M",
    verbose: bool = False,
    *,
    on_wait: Callable[[], None] | None = None,
) -> Path:
    """Quantize a f16/f32 GGUF with llama.cpp's own quantizer (K-quants such as Q4_K_M); the new path."""
    check_quant_type(quant)  # an unknown or imatrix-only type is refused before anything runs
    quant = quant.upper()  # llama.cpp's own name: its quantizer also writes Q8_0 and F16
    llama_cpp = _import_llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}", None)
    if ftype is None:
        raise ExportError(
            f"llama.cpp's quantizer has no type {quant}; write f32 files with gguf.write_gguf, or install "
            f"the version this book uses: {LLAMA_CPP_INSTALL}"
        )
    f16_path = Path(f16_path).expanduser()
    if not f16_path.is_file():
        raise ExportError(f"No GGUF file at {f16_path}: write one first with write_gguf(..., dtype='f16').")
    try:
        tensors = gguf.GGUFReader(f16_path).tensors
    except (ValueError, OSError) as error:
        raise ExportError(f"{f16_path} is not a readable GGUF file ({error}); write it again.") from error
    if "_K" in quant:
        # K-quants pack 256 values per block; narrower rows make llama.cpp fall back to older types.
        narrow = [t.name for t in tensors if len(t.shape) == 2 and t.shape[0] % 256]
        if narrow:
            print(f"Rows of {narrow} are not a multiple of 256: llama.cpp will not use {quant} for them.",
                  file=sys.stderr)  # fmt: skip
    with atomic_output(out_path) as tmp, tempfile.TemporaryFile() as log:
        command = [sys.executable, "-c", _QUANTIZE_CHILD, str(f16_path), str(tmp), str(ftype)]
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    status = child.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    if on_wait is not None:
                        on_wait()  # e.g. refresh a progress bar; a KeyboardInterrupt here stops the run
        except BaseException:  # Ctrl-C or an error in on_wait: stop llama.cpp; atomic_output cleans up
            child.kill()
            child.wait()
            raise
        log.seek(0)
        text = log.read().decode(errors="replace")
        if verbose:
            print(text, file=sys.stderr)
        if status != 0:
            tail = "\n".join(text.strip().splitlines()[-8:])
            raise ExportError(
                f"llama.cpp could not quantize {f16_path} to {quant} (exit status {status}). "
                f"Its log ends:\n{tail}"
            )
    return Path(out_path).expanduser()


# --- Checking a GGUF file against transformers ---------------------------------------------------


@dataclass
class PromptComparison:
    """transformers vs llama.cpp on one prompt: logits on the prompt, then greedy continuations."""

    prompt_ids: list[int]
    max_abs_logit_diff: float
    argmax_agreement: float
    hf_tokens: list[int]
    gguf_tokens: list[int]
    first_divergence: int | None  # index into the generated tokens; None when all are equal
    gap_at_divergence: float | None  # transformers' top-1 minus top-2 logit there: small = a near tie
    # at each prompt position where the two argmaxes differ: transformers' logit of its own pick minus its
    # logit of llama.cpp's pick (small = a near tie that rounding alone can flip)
    argmax_miss_gaps: tuple[float, ...] = ()


@dataclass
class GGUFComparison:
    """One GGUF file compared with the transformers model on several prompts."""

    gguf_path: Path
    prompts: list[PromptComparison] = field(default_factory=list)

    @property
    def max_abs_logit_diff(self) -> float:
        """Largest |logit difference| over all prompts."""
        return max(p.max_abs_logit_diff for p in self.prompts)

    @property
    def argmax_agreement(self) -> float:
        """Fraction of all prompt positions where both pick the same next token."""
        n = sum(len(p.prompt_ids) for p in self.prompts)
        return sum(p.argmax_agreement * len(p.prompt_ids) for p in self.prompts) / n

    def argmax_agreement_except_ties(self, tie_gap: float) -> float:
        """Argmax agreement, a miss counted as agreed where transformers' two picks were < tie_gap apart."""
        n = sum(len(p.prompt_ids) for p in self.prompts)
        near_ties = sum(gap < tie_gap for p in self.prompts for gap in p.argmax_miss_gaps)
        return self.argmax_agreement + near_ties / n

    @property
    def greedy_equal(self) -> bool:
        """True when every prompt's greedy continuation is the same token for token."""
        return all(p.first_divergence is None for p in self.prompts)

    def greedy_equal_except_ties(self, tie_gap: float) -> bool:
        """Greedy tokens equal, or first different where transformers' top two logits were < tie_gap apart."""
        # If every logit is within eps of the other side, the argmax can only flip where the top two
        # logits are within 2 * eps: such a divergence is rounding, not a conversion error.
        return all(p.first_divergence is None or p.gap_at_divergence < tie_gap for p in self.prompts)

    def summary(self) -> str:
        """One line: max |dlogit|, argmax agreement and greedy agreement."""
        diverged = [p.first_divergence for p in self.prompts if p.first_divergence is not None]
        return (
            f"{self.gguf_path.name}: max |dlogit| {self.max_abs_logit_diff:.3g}, "
            f"argmax agreement {self.argmax_agreement:.1%}, greedy equal on "
            f"{len(self.prompts) - len(diverged)}/{len(self.prompts)} prompts"
            + (f" (first divergence at token {min(diverged)})" if diverged else "")
        )


@torch.no_grad()
def _hf_logits_and_greedy(
    model: torch.nn.Module, ids: list[int], max_new_tokens: int
) -> tuple[np.ndarray, list[int], list[float]]:
    """Prompt logits (T, V), greedy tokens, and the top-1/top-2 gap at each greedy step."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    prompt_logits = out.logits[0].float().numpy()
    tokens, gaps = [], []
    for _ in range(max_new_tokens):  # no stop on EOS: both sides must produce the same number of tokens
        top2 = out.logits[0, -1].float().topk(2)
        tokens.append(int(top2.indices[0]))
        gaps.append(float(top2.values[0] - top2.values[1]))
        out = model(
            input_ids=top2.indices[:1].view(1, 1), past_key_values=out.past_key_values, use_cache=True
        )
    return prompt_logits, tokens, gaps


def _llama_cpp_logits_and_greedy(
    llm: object, ids: list[int], max_new_tokens: int
) -> tuple[np.ndarray, list[int]]:
    """The same as _hf_logits_and_greedy, computed by llama.cpp."""
    llm.reset()
    llm.eval(ids)  # exactly these ids: llama.cpp adds no BOS on this path
    prompt_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    tokens = []
    for _ in range(max_new_tokens):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return prompt_logits, tokens


def compare_with_llama_cpp(
    model: torch.nn.Module,
    tokenizer: object,
    gguf_path: str | os.PathLike,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int = 16,
    **llama_options: Any,
) -> GGUFComparison:
    """Feed the same token ids to transformers and to llama.cpp and compare logits and greedy tokens."""
    # Special tokens written in a prompt (<|im_start|>) become their ids; nothing else is added.
    all_ids = [
        list(p) if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    n_ctx = max(len(ids) for ids in all_ids) + max_new_tokens + 1
    model.eval()
    llm = open_llama(gguf_path, logits_all=True, n_ctx=n_ctx, **llama_options)  # e.g. lora_path=...
    report = GGUFComparison(Path(gguf_path))
    try:
        for ids in all_ids:
            hf_logits, hf_tokens, gaps = _hf_logits_and_greedy(model, ids, max_new_tokens)
            cpp_logits, cpp_tokens = _llama_cpp_logits_and_greedy(llm, ids, max_new_tokens)
            if cpp_logits.shape != hf_logits.shape:
                raise ExportError(
                    f"{gguf_path} gives logits of shape {cpp_logits.shape}, transformers {hf_logits.shape}."
                )
            pairs = enumerate(zip(hf_tokens, cpp_tokens, strict=True))
            divergence = next((i for i, (a, b) in pairs if a != b), None)
            hf_pick, cpp_pick = hf_logits.argmax(-1), cpp_logits.argmax(-1)
            misses = np.flatnonzero(hf_pick != cpp_pick)
            miss_gaps = hf_logits[misses, hf_pick[misses]] - hf_logits[misses, cpp_pick[misses]]
            report.prompts.append(
                PromptComparison(
                    prompt_ids=ids,
                    max_abs_logit_diff=float(np.abs(hf_logits - cpp_logits).max()),
                    argmax_agreement=float((hf_pick == cpp_pick).mean()),
                    hf_tokens=hf_tokens,
                    gguf_tokens=cpp_tokens,
                    first_divergence=divergence,
                    gap_at_divergence=None if divergence is None else gaps[divergence],
                    argmax_miss_gaps=tuple(float(gap) for gap in miss_gaps),
                )
            )
    finally:
        llm.close()
    return report


def generate_with_llama_cpp(
    gguf_path: str | os.PathLike,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    *,
    prefix_ids: Sequence[int] = (),
    n_ctx: int = 512,
) -> list[str]:
    """Greedy replies from llama.cpp alone: its tokenizer, its model, its sampler, as a server runs them."""
    llm = open_llama(gguf_path, n_ctx=n_ctx)
    replies = []
    try:
        for prompt in prompts:
            # Token ids, not the string: for a string llama.cpp adds a BOS when the file says add_bos_token
            # (Llama 3's do), and a chat template that writes <|begin_of_text|> itself would get two.
            # prefix_ids puts tokens in front anyway: what a runtime that adds a BOS token would send.
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            request = [*prefix_ids, *ids]
            llm.reset()  # no reuse of the previous prompt's cache: every prompt starts clean
            # temperature 0 selects llama.cpp's greedy sampler; generation stops at the file's EOS token.
            with warnings.catch_warnings():
                if prefix_ids:  # a prefix on purpose: llama-cpp-python's duplicate-BOS warning is no news
                    warnings.filterwarnings("ignore", "Detected duplicate leading", RuntimeWarning)
                completion = llm.create_completion(request, max_tokens=max_new_tokens, temperature=0.0)
            replies.append(completion["choices"][0]["text"])
    finally:
        llm.close()
    return replies


def exact_match_with_llama_cpp(
    gguf_path: str | os.PathLike, tokenizer: object, tasks: Sequence, **options: object
) -> object:
    """evaluate.exact_match's report, with the replies generated by llama.cpp from the GGUF file."""
    from ftcourse.evaluate import chat_prompt, score_replies

    prompts = [chat_prompt(tokenizer, task) for task in tasks]
    return score_replies(generate_with_llama_cpp(gguf_path, prompts, **options), tasks)


# --- Held-out sets (ftcourse.heldout), served by llama.cpp ------------------------------------------


def heldout_prompts(tokenizer: Any, heldout: Any) -> list[str]:
    """Each held-out row's chat prompt: a task's question, or a record's turns before its last reply."""
    from ftcourse.evaluate import chat_prompt

    if heldout.schema == "tasks":
        return [chat_prompt(tokenizer, task) for task in heldout.rows]
    if heldout.schema != "messages":
        raise ValueError(
            f"prompts come from held-out rows of schema 'tasks' or 'messages', got {heldout.schema!r}"
        )
    return [
        tokenizer.apply_chat_template(
            [dict(turn) for turn in row["messages"][:-1]], tokenize=False, add_generation_prompt=True
        )
        for row in heldout.rows
    ]


def transformers_replies(model: Any, tokenizer: Any, heldout: Any, max_new_tokens: int = 16) -> list[str]:
    """transformers' greedy replies to a held-out set, cut at the end of the turn as exact match cuts them."""
    from ftcourse.evaluate import first_answer, generate

    prompts = heldout_prompts(tokenizer, heldout)
    return [first_answer(reply) for reply in generate(model, tokenizer, prompts, max_new_tokens)]


def _reply_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], int]:
    """A conversation's token ids and the index of its last reply's first token (as heldout.reply_logprob)."""
    from trl.data_utils import common_prefix_length

    def ids(turns: Sequence[Mapping[str, str]], generation: bool) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            [dict(t) for t in turns], tokenize=True, add_generation_prompt=generation, return_dict=True
        )
        return list(encoded["input_ids"])

    full = ids(messages, False)
    return full, max(1, common_prefix_length(ids(messages[:-1], True), full))


def reply_logprobs_with_llama_cpp(
    gguf_path: str | os.PathLike,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    prefix_ids: Sequence[int] = (),
) -> list[float]:
    """Per chat record, the mean log-probability per token llama.cpp gives its last reply (the reference)."""
    rows = [_reply_ids(tokenizer, r["messages"]) for r in records]
    rows = [([*prefix_ids, *full], start + len(prefix_ids)) for full, start in rows]
    llm = open_llama(gguf_path, logits_all=True, n_ctx=max(len(full) for full, _ in rows) + 1)
    scores = []
    try:
        for full, start in rows:
            llm.reset()
            llm.eval(full)  # exactly these ids, as transformers reads them
            # position i predicts token i + 1: the reply's tokens full[start:] are read from start - 1 on
            logits = np.array(llm.scores[start - 1 : len(full) - 1], dtype=np.float64)  # (reply, V)
            top = logits.max(axis=-1, keepdims=True)
            log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
            scores.append(float(log_probs[np.arange(len(full) - start), full[start:]].mean()))
    finally:
        llm.close()
    return scores


def score_with_llama_cpp(gguf_path: str | os.PathLike, tokenizer: Any, heldout: Any, **options: Any) -> Any:
    """heldout.score with llama.cpp serving the file: exact match on tasks, reference likelihood on hub rows.

    On tasks this is exact_match_with_llama_cpp. On chat records the score of each row is the mean
    log-probability per token llama.cpp gives the reference reply (heldout.SCORE_WORDS["messages"]), and
    the report's `replies` are llama.cpp's greedy replies, cut at the end of the turn. `prefix_ids` puts
    tokens in front of every prompt, as a runtime that adds a BOS token would.
    """
    if heldout.schema == "tasks":
        return exact_match_with_llama_cpp(gguf_path, tokenizer, list(heldout.rows), **options)
    from ftcourse.evaluate import first_answer
    from ftcourse.heldout import ReplyReport
    from ftcourse.profiles import note_source

    if heldout.schema != "messages":
        raise ValueError(f"llama.cpp scores tasks or chat records ('messages'), got {heldout.schema!r}")
    unknown = set(options) - {"prefix_ids", "max_new_tokens"}
    if unknown:
        raise ValueError(f"score_with_llama_cpp takes prefix_ids and max_new_tokens, got {sorted(unknown)}")
    note_source("capability" if heldout.capability else "score", heldout.source, heldout.measure)
    values = reply_logprobs_with_llama_cpp(gguf_path, tokenizer, heldout.rows, options.get("prefix_ids", ()))
    prompts = heldout_prompts(tokenizer, heldout)
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    n_ctx = longest + len(options.get("prefix_ids", ())) + options.get("max_new_tokens", 16) + 1
    replies = generate_with_llama_cpp(gguf_path, prompts, n_ctx=max(n_ctx, 512), **options)
    return ReplyReport.from_scores(values, heldout, [first_answer(r) for r in replies])


def check_comparison(report: GGUFComparison, tolerance: Tolerance) -> list[str]:
    """The ways report misses tolerance, in words; an empty list when the file passes."""
    failures = []
    if not np.isfinite(report.max_abs_logit_diff):  # NaN compares False with everything: say it outright
        failures.append(f"logits are not finite (max |dlogit| {report.max_abs_logit_diff})")
    elif (bound := tolerance.max_abs_logit_diff) is not None and not report.max_abs_logit_diff < bound:
        failures.append(f"max |dlogit| {report.max_abs_logit_diff:.3g} >= {bound:g}")
    agreement, how = report.argmax_agreement, ""
    if tolerance.max_abs_logit_diff is not None:
        # With every logit within the bound of the other side, the argmax may flip wherever transformers'
        # two candidates are less than twice the bound apart: such a flip is within tolerance, not an error.
        # How many such near ties a prompt has depends on the CPU's rounding (AVX2 vs AVX512 kernels).
        tie_gap = 2 * tolerance.max_abs_logit_diff
        agreement = report.argmax_agreement_except_ties(tie_gap)
        how = f" (near ties under {tie_gap:g} apart counted as agreed; plain {report.argmax_agreement:.1%})"
    if not agreement >= tolerance.min_argmax_agreement:  # NaN fails too
        failures.append(f"argmax agreement {agreement:.1%} < {tolerance.min_argmax_agreement:.0%}{how}")
    return failures


# --- A quantization ladder: what each type costs in size and quality ---------------------------------

LADDER_TYPES = ("f16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


def perplexity_with_llama_cpp(gguf_path: str | os.PathLike, texts: Sequence[Sequence[int]]) -> float:
    """exp of the mean negative log-likelihood llama.cpp gives each token after the first, over all texts."""
    llm = open_llama(gguf_path, logits_all=True, n_ctx=max(len(ids) for ids in texts) + 1)
    total, count = 0.0, 0
    try:
        for ids in texts:
            llm.reset()
            llm.eval(list(ids))
            logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, V): predicts ids[1:]
            top = logits.max(axis=-1, keepdims=True)
            log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
            total -= float(log_probs[np.arange(len(ids) - 1), list(ids[1:])].sum())
            count += len(ids) - 1
    finally:
        llm.close()
    return float(np.exp(total / count))


def greedy_tokens_with_llama_cpp(
    gguf_path: str | os.PathLike, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16
) -> list[list[int]]:
    """llama.cpp's greedy continuation (token ids, no stop) of each prompt."""
    llm = open_llama(gguf_path, logits_all=True, n_ctx=max(len(p) for p in prompts) + max_new_tokens + 1)
    try:
        return [_llama_cpp_logits_and_greedy(llm, list(ids), max_new_tokens)[1] for ids in prompts]
    finally:
        llm.close()


@dataclass(frozen=True)
class LadderRung:
    """One GGUF type of the ladder: its file, size, perplexity and greedy agreement with f16."""

    quant: str
    path: Path
    file_bytes: int
    bits_per_weight: float  # whole file, metadata included
    tensor_bits_per_weight: float
    perplexity: float
    greedy_agreement: float  # share of greedy tokens equal to f16's, each prompt counted to its first miss


def quantization_ladder(
    f16_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    texts: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    quants: Sequence[str] = LADDER_TYPES,
    max_new_tokens: int = 16,
) -> list[LadderRung]:
    """Quantize f16_path to each type and measure size, held-out perplexity and greedy agreement with f16."""
    from ftcourse.gguf import gguf_stats

    out_dir = Path(out_dir).expanduser()
    reference = greedy_tokens_with_llama_cpp(f16_path, prompts, max_new_tokens)
    rungs = []
    for quant in quants:
        path = (
            Path(f16_path)
            if quant == "f16"
            else quantize_gguf(f16_path, out_dir / f"model-{quant}.gguf", quant)
        )
        tokens = reference if quant == "f16" else greedy_tokens_with_llama_cpp(path, prompts, max_new_tokens)
        agreed = 0
        for mine, ref in zip(tokens, reference, strict=True):  # tokens up to the first disagreement
            agreed += next((i for i, (a, b) in enumerate(zip(mine, ref, strict=True)) if a != b), len(ref))
        stats = gguf_stats(path)
        rungs.append(
            LadderRung(quant, path, stats.file_bytes, stats.bits_per_weight, stats.tensor_bits_per_weight,
                       perplexity_with_llama_cpp(path, texts), agreed / (len(prompts) * max_new_tokens))
        )  # fmt: skip
    return rungs


def serving_gb(
    model: str, bits_per_weight: float, context_tokens: int, kv_bits: int = 16
) -> dict[str, float]:
    """GB (decimal) a served GGUF model takes: its weights, plus the KV cache of one context."""
    from ftcourse.memory import architecture

    arch = architecture(model)
    weights = arch.total_params() * bits_per_weight / 8
    # keys and values, every layer, every KV head: 2 x layers x kv_width per token (f16 cache by default)
    kv_cache = 2 * arch.num_layers * arch.kv_width * context_tokens * kv_bits / 8
    return {"weights": weights / 1e9, "kv_cache": kv_cache / 1e9, "total": (weights + kv_cache) / 1e9}
