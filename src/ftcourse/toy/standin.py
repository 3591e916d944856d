"""Stand-ins for the spark profile's hub downloads: a tiny Llama-3.1-shaped model and hub-shaped datasets.

The spark profile loads Llama 3.1 and five hub datasets. None of them can be fetched on a machine without
the hub, so none of the spark code path could run there. The stand-ins are made here, in seconds, from
nothing but this package: a random-init `LlamaForCausalLM` with every architecture feature of Llama 3.1
(llama3-scaled RoPE, grouped-query attention, untied embeddings, a byte-level BPE tokenizer with Llama 3's
pre-tokenizer regex, special tokens, chat template and BOS), and datasets with the exact columns and
nesting of the hub ones, rows written from the toy task world. The model answers nothing correctly; it
takes every code path a real Llama 3.1 takes.

    eval "$(python -m ftcourse.toy.standin)"   # FTCOURSE_PROFILE=spark, FTCOURSE_MODEL, FTCOURSE_DATASETS

Never used by default: only `activate` (or the shell line above) points the spark profile at them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from ftcourse.toy.corpus import pretraining_documents
from ftcourse.toy.tasks import build_tasks

STANDIN_VERSION = "1"  # the cache folder name carries it, and a hash of this file
CACHE_ENV = "FTCOURSE_CACHE"
DATASETS_ENV = "FTCOURSE_DATASETS"  # read by ftcourse.profiles.resolve_dataset

# Llama 3's pre-tokenizer split (tokenizer.json of meta-llama/Llama-3.1-8B): contractions, letters with
# one leading non-letter, digits in runs of at most three, punctuation runs, newlines, whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's first special tokens, in Llama 3's order (ids 128000-128010 there, right after the BPE vocab).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"  # the Instruct model's tokenizer ends turns with <|eot_id|>
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # generation_config.eos_token_id of 3.1
# Llama 3.1's chat template in structure (BOS in the template, a system block with the knowledge-date
# lines always present, headers, <|eot_id|> after every turn), written for this package; the assistant
# content is wrapped in {% generation %} so TRL's assistant_only_loss can find it (Meta's template has no
# markers; a reader training a real 3.1 with assistant_only_loss needs a template with them, like this one).
LLAMA3_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Llama 3.1's rope_scaling (config.json of meta-llama/Llama-3.1-8B-Instruct).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Tiny sizes with 3.1's ratios that matter: 2 query heads per KV head, head_dim large enough that the
# llama3 scaling has dimensions in all three bands (unscaled, smoothed, scaled by `factor`).
MODEL_SIZES = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
}
BPE_VOCAB = 1500  # asked of the trainer; the corpus's variety decides how many it really makes

# --- the tokenizer ---------------------------------------------------------------------------------

EXTRA_TEXT = (  # so that Unicode, code and whitespace runs are in the training corpus, not only bytes
    "def add(a, b):\n    return a + b  # sum\n\n\tif x == 10:\n        print(f'{x:>4}')\n",
    "Ünïcödé naïve café — déjà vu. 数字 123456 と 東京. Привет, мир! emoji 🙂 'quotes' don't",
    "Numbers: 1, 22, 333, 4444, 55555, 3.14159, -7, 1e-5, 2026-12-01.",
    '{"key": [1, 2, 3], "ok": true}   <tag attr="v">text</tag>\r\n\r\n',
)


def tokenizer_corpus() -> Iterator[str]:
    """The text the stand-in's BPE is trained on: toy pretraining documents, task prompts, extra samples."""
    yield from pretraining_documents(300, seed=7)
    for task in build_tasks("train", 60):
        yield f"{task.prompt}\n{task.answer}"
    yield from EXTRA_TEXT * 20


def build_tokenizer() -> Any:
    """A Llama-3-shaped fast tokenizer (transformers), trained in about a second on tokenizer_corpus()."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))  # Llama 3 looks whole words up before merging
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    n_regular = tokenizer.get_vocab_size()
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + (-(n_regular + 11) % 64))]
    specials = list(LLAMA3_SPECIAL_TOKENS) + reserved  # the vocabulary ends on a multiple of 64
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(  # BOS before every encoded text, as Llama 3's does
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=MODEL_SIZES["max_position_embeddings"],
        clean_up_tokenization_spaces=True,
    )


# --- the model -------------------------------------------------------------------------------------


def build_model(tokenizer: Any, seed: int = 0) -> Any:
    """A random-init LlamaForCausalLM with Llama 3.1's features, sized for tokenizer, in bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        **MODEL_SIZES,
        vocab_size=len(tokenizer),
        rope_parameters=dict(LLAMA3_ROPE),
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=ids(BOS),
        eos_token_id=[ids(t) for t in STOP_TOKENS],
        pad_token_id=None,  # Llama 3.1 has none: code that pads must choose one
        initializer_range=0.1,  # spread-out logits, so greedy argmax is not a coin toss under f16 rounding
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [ids(t) for t in STOP_TOKENS]
    model.generation_config.bos_token_id = ids(BOS)
    model.generation_config.do_sample = False
    return model


# --- hub-shaped datasets -----------------------------------------------------------------------------

# Each stand-in: hub id -> (config name, {split: rows}) with the hub dataset's columns in its order.


def _conversation(task: Any) -> list[dict[str, str]]:
    """A user/assistant exchange about one toy task, as the hub's message dicts {content, role}."""
    return [{"content": task.prompt, "role": "user"}, {"content": task.answer, "role": "assistant"}]


def _wrong(task: Any) -> str:
    """A plausible wrong answer to task."""
    return task.distractors[0] if task.distractors else f"not {task.answer}"


def alpaca_rows(split: str, n: int) -> list[dict[str, Any]]:
    """yahma/alpaca-cleaned: output, input, instruction (strings; input often empty)."""
    return [
        {"output": t.answer, "input": t.input, "instruction": t.instruction} for t in build_tasks(split, n)
    ]


def no_robots_rows(split: str, n: int) -> list[dict[str, Any]]:
    """HuggingFaceH4/no_robots: prompt, prompt_id (sha256), messages (some with a system turn), category."""
    rows = []
    for i, task in enumerate(build_tasks(split, n)):
        messages = _conversation(task)
        if i % 3 == 0:
            messages.insert(
                0, {"content": "You are a helpful assistant who answers briefly.", "role": "system"}
            )
        if i % 5 == 0:  # a multi-turn chat, as the hub's "Chat" category holds
            messages += [{"content": "Thanks! Say it again.", "role": "user"}, dict(messages[-1])]
        rows.append(
            {
                "prompt": task.prompt,
                "prompt_id": hashlib.sha256(task.prompt.encode()).hexdigest(),
                "messages": messages,
                "category": "Chat"
                if i % 5 == 0
                else ("Open QA" if task.family == "capital" else "Closed QA"),
            }
        )
    return rows


def ultrafeedback_rows(split: str, n: int) -> list[dict[str, Any]]:
    """trl-lib/ultrafeedback_binarized: chosen, rejected (conversations with an implicit prompt), scores."""
    rows = []
    for i, task in enumerate(build_tasks(split, n)):
        chosen = _conversation(task)
        rejected = [dict(chosen[0]), {"content": _wrong(task), "role": "assistant"}]
        rows.append(
            {"chosen": chosen, "rejected": rejected, "score_chosen": 8.0 + i % 3, "score_rejected": 4.5}
        )
    return rows


def kto_rows(split: str, n: int) -> list[dict[str, Any]]:
    """trl-lib/kto-mix-14k: prompt and completion as message lists, label (bool).

    The hub dataset is argilla/dpo-mix-7k cut in two: each pair gives a liked and a disliked row of one
    prompt. The stand-in does the same, so its test split pairs up again (train.feedback_pairs).
    """
    rows = []
    for task in build_tasks(split, max(1, n // 2)):  # two rows per task: as many rows as the other stand-ins
        for good in (True, False):
            rows.append(
                {
                    "prompt": [{"content": task.prompt, "role": "user"}],
                    "completion": [{"content": task.answer if good else _wrong(task), "role": "assistant"}],
                    "label": good,
                }
            )
    return rows


def wikitext_rows(split: str, n: int) -> list[dict[str, Any]]:
    """Salesforce/wikitext (wikitext-2-raw-v1): one `text` column of lines, headings and blank lines too."""
    rows: list[dict[str, Any]] = []
    seed = {"train": 11, "validation": 12, "test": 13}[split]
    for i, document in enumerate(pretraining_documents(n, seed=seed)):
        # a heading, blank lines, then the document as one paragraph line, as wikitext stores articles
        paragraph = " ".join(document.split("\n"))
        rows += [{"text": ""}, {"text": f" = Section {i} = \n"}, {"text": ""}, {"text": f" {paragraph} \n"}]
    return rows


DATASETS: dict[str, tuple[str, dict[str, Any]]] = {
    "yahma/alpaca-cleaned": ("default", {"train": alpaca_rows}),
    "HuggingFaceH4/no_robots": ("default", {"train": no_robots_rows, "test": no_robots_rows}),
    "trl-lib/ultrafeedback_binarized": ("default", {"train": ultrafeedback_rows, "test": ultrafeedback_rows}),
    "trl-lib/kto-mix-14k": ("default", {"train": kto_rows, "test": kto_rows}),
    "Salesforce/wikitext": (
        "wikitext-2-raw-v1",
        {"train": wikitext_rows, "validation": wikitext_rows, "test": wikitext_rows},
    ),
}
ROWS_PER_FAMILY = 16  # 64 rows per split: "a few dozen", enough for the chapters at minimal sizes


def write_dataset(
    folder: Path, config: str, splits: Mapping[str, Any], per_family: int, folder_tag: str = "standin"
) -> Path:
    """One hub-shaped dataset folder: a JSON Lines file per split and a README naming the config."""
    folder.mkdir(parents=True, exist_ok=True)
    card = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, make_rows in splits.items():
        # The name carries the folder's name (a hash of this file): datasets caches a local folder's
        # splits under a key made from the relative file names, and would serve an older stand-in's rows.
        name = f"{config}/{split}-{folder_tag}.jsonl"
        (folder / config).mkdir(exist_ok=True)
        with open(folder / name, "w", encoding="utf-8") as out:
            for row in make_rows(split, per_family):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        card += [f"  - split: {split}", f"    path: {name}"]
    if config == "default":
        card.insert(3, "  default: true")
    (folder / "README.md").write_text(
        "\n".join(card + ["---", "Stand-in written by ftcourse.toy.standin.", ""])
    )
    return folder


# --- the cache, and switching the spark profile to it ----------------------------------------------


def standin_root() -> Path:
    """The cache folder for the stand-ins: $FTCOURSE_CACHE or the checkout's _build/ftcourse-cache."""
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        base = Path(override).expanduser()
    else:
        repo = Path(__file__).resolve().parents[3]  # src/ftcourse/toy/standin.py -> the checkout
        writable = (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK)
        base = repo / "_build" / "ftcourse-cache" if writable else Path.home() / ".cache" / "ftcourse"
    # the folder name carries a hash of this file: edit the generator and the next call builds afresh
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return base / f"spark-standin-v{STANDIN_VERSION}-{source}"


def _build_into(root: Path) -> None:
    """Write model, tokenizer and datasets under root (a fresh folder)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for writing a 1 MB shard is noise
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for hub_id, (config, splits) in DATASETS.items():
        write_dataset(root / "datasets" / hub_id, config, splits, ROWS_PER_FAMILY, standin_root().name)
    (root / "complete").write_text("ok\n")


def build_standins(root: str | os.PathLike | None = None) -> Path:
    """The stand-in folder (model/ and datasets/<hub id>/), built on first use; later calls reuse it."""
    import shutil
    import tempfile

    root = Path(root) if root is not None else standin_root()
    if (root / "complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        _build_into(stage)
        try:
            stage.rename(root)  # atomic: a reader sees no folder or a complete one
        except OSError:  # another process finished first; use its copy
            if not (root / "complete").is_file():
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return root


def standin_environment(root: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment variables that point the spark profile at the stand-ins, offline."""
    from ftcourse.profiles import DEVICE_ENV, MODEL_ENV, OFFLINE_ENV, PROFILE_ENV, SIZES_ENV

    root = build_standins(root)
    return {
        PROFILE_ENV: "spark",
        DEVICE_ENV: os.environ.get(DEVICE_ENV) or "cpu",  # the spark code path, bf16 included, on a CPU
        MODEL_ENV: str(root / "model"),
        DATASETS_ENV: str(root / "datasets"),
        SIZES_ENV: "minimal",  # a smoke test of the code path, not a measurement
        **OFFLINE_ENV,
    }


def activate(environ: MutableMapping[str, str] | None = None, root: str | os.PathLike | None = None) -> dict:
    """Set standin_environment() in environ (default os.environ, before HF libraries load); what was set."""
    values = standin_environment(root)
    (os.environ if environ is None else environ).update(values)
    return values


if __name__ == "__main__":  # eval "$(python -m ftcourse.toy.standin)" in a shell
    sys.stdout.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in standin_environment().items()))
