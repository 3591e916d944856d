"""Command line: `ftcourse export MODEL_DIR OUT_DIR [--base BASE] [--quant Q ...] [--ollama-name NAME]` and
`ftcourse fit-check MODEL [--method M] [--objective O] [--device spark] [--config FOLDER] ...` (its arguments
live beside the estimator, in `ftcourse.memory.add_fit_check_arguments`).

Each sub-command is a function in SUBCOMMANDS that adds its parser and sets `run`, the function that
executes it and returns the exit status. A new sub-command is one more function in that list.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ftcourse.memory import add_fit_check_command
from ftcourse.train import add_train_command

DEFAULT_QUANTS = ("f16", "q8_0", "Q4_K_M")
# Short prompts for --check: a ChatML turn and two plain continuations.
CHECK_PROMPTS = ("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "The", "Once upon a time")
EXIT_INTERRUPTED = 130  # the shell's status for a run ended by Ctrl-C (128 + SIGINT)


def _check_help() -> str:
    """The --check help text, with every tolerance spelled out."""
    from ftcourse.llamacpp import CHECK_TOLERANCES

    rules = "; ".join(f"{quant}: {tolerance.describe()}" for quant, tolerance in CHECK_TOLERANCES.items())
    rules = rules.replace("%", "%%")  # argparse formats help strings with %
    return (
        "compare every GGUF file with transformers through llama.cpp on three short prompts and exit 1 if "
        f"a file does not load or misses its tolerance ({rules}; Q4/Q5 mean every Q4_*/Q5_* type)"
    )


def add_export_command(commands: Any) -> None:
    """The `export` sub-command: merge an adapter, write GGUF files and a Modelfile."""
    export = commands.add_parser(
        "export", help="merge an adapter and write GGUF files and an Ollama Modelfile"
    )
    export.add_argument(
        "model_dir", help="a Hugging Face model folder, or a PEFT adapter folder (then give --base)"
    )
    export.add_argument(
        "out_dir",
        help="folder for the merged model, the GGUF files and the Modelfile; a new or empty folder, or an "
        "earlier export, which is replaced as a whole",
    )
    export.add_argument("--base", metavar="BASE_DIR", help="local base model folder for an adapter folder")
    export.add_argument(
        "--quant",
        action="append",
        metavar="TYPE",
        help="f32, f16, q8_0 or a llama.cpp type such as Q4_K_M; repeatable "
        f"(default: {' '.join(DEFAULT_QUANTS)})",
    )
    export.add_argument(
        "--ollama-name", metavar="NAME", help="also register the model with a running Ollama server"
    )
    export.add_argument("--system", metavar="TEXT", help="system prompt written into the Modelfile")
    export.add_argument("--check", action="store_true", help=_check_help())
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.set_defaults(run=run_export)


SUBCOMMANDS: list[Callable[[Any], None]] = [add_export_command, add_fit_check_command, add_train_command]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; one sub-command per function in SUBCOMMANDS."""
    parser = argparse.ArgumentParser(prog="ftcourse", description="Tools that go with the fine-tuning book.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in SUBCOMMANDS:
        add_command(commands)
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run export_pipeline from parsed arguments; the exit status is non-zero if any step failed."""
    from ftcourse.atomic import OutputError
    from ftcourse.export import ExportError, export_pipeline

    try:
        result = export_pipeline(
            args.model_dir,
            args.out_dir,
            args.quant or DEFAULT_QUANTS,
            base_model_dir=args.base,
            ollama_name=args.ollama_name,
            system_prompt=args.system,
            progress=not args.no_progress,
        )
        print(result.table())
        checked = check_files(result.hf_dir, result.gguf_files) if args.check else True
    except (ExportError, OutputError) as error:
        print(f"ftcourse export: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ftcourse export: interrupted; {args.out_dir} is as it was before the run.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 1 if result.ollama_error or result.skipped or not checked else 0


def check_files(hf_dir: str | Path, gguf_files: dict[str, Path] | Iterable[Path]) -> bool:
    """Compare each GGUF file with transformers, print PASS/FAIL per file; True when all pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcourse.gguf import ExportError
    from ftcourse.llamacpp import check_comparison, check_tolerance, compare_with_llama_cpp

    if not isinstance(gguf_files, dict):  # plain paths: the type is in the name, model-<type>.gguf
        gguf_files = {Path(p).stem.removeprefix("model-"): Path(p) for p in gguf_files}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for loading the model is noise between the PASS/FAIL lines
    # The reference in float32, whatever config.json's dtype: transformers 5 loads in that dtype by default,
    # and a bf16 reference is itself off by more than --check allows an f16 file (0.11 against 0.05).
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    all_pass = True
    for quant, path in gguf_files.items():
        tolerance = check_tolerance(quant)
        try:
            report = compare_with_llama_cpp(model, tokenizer, path, CHECK_PROMPTS, max_new_tokens=16)
        except ExportError as error:
            print(f"FAIL {path.name}: does not load ({error})")
            all_pass = False
            continue
        failures = check_comparison(report, tolerance)
        all_pass &= not failures
        verdict = f"FAIL ({'; '.join(failures)})" if failures else "PASS"
        print(f"{verdict} {report.summary()}; required: {tolerance.describe()}")
    return all_pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ftcourse` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
