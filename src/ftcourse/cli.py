"""Command line: `ftcourse export MODEL_DIR OUT_DIR [--base BASE] [--quant Q ...] [--ollama-name NAME]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_QUANTS = ("f16", "q8_0", "Q4_K_M")
# Short prompts for --check: a ChatML turn and two plain continuations.
CHECK_PROMPTS = ("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "The", "Once upon a time")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; one sub-command per task."""
    parser = argparse.ArgumentParser(prog="ftcourse", description="Tools that go with the fine-tuning book.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="merge an adapter and write GGUF files and an Ollama Modelfile"
    )
    export.add_argument(
        "model_dir", help="a Hugging Face model folder, or a PEFT adapter folder (then give --base)"
    )
    export.add_argument("out_dir", help="folder for the merged model, the GGUF files and the Modelfile")
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
    export.add_argument(
        "--check", action="store_true", help="compare every GGUF file with transformers via llama.cpp"
    )
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run export_pipeline from parsed arguments; the exit status is 1 if a requested step failed."""
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
    except ExportError as error:
        print(f"ftcourse export: {error}", file=sys.stderr)
        return 1
    print(result.table())
    if args.check:
        check_files(result.hf_dir, result.gguf_files.values())
    return 1 if result.ollama_error or result.skipped else 0


def check_files(hf_dir, gguf_files) -> None:
    """Print compare_with_llama_cpp's summary for each GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcourse.export import compare_with_llama_cpp

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for path in gguf_files:
        print(compare_with_llama_cpp(model, tokenizer, path, CHECK_PROMPTS, max_new_tokens=16).summary())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ftcourse` command."""
    args = build_parser().parse_args(argv)
    if args.command == "export":
        return run_export(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
