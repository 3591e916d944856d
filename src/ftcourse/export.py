"""Deployment pipeline: adapter -> merged Hugging Face folder -> GGUF files -> Modelfile -> Ollama.

    check everything -> merge.merge_into_folder (an adapter folder: shard by shard) or merge.save_merged
    (a model in memory) -> gguf.write_gguf (f16, q8_0) -> llamacpp.quantize_gguf
    (Q4_K_M) -> ollama.write_modelfile -> manifest -> the folder replaces OUT_DIR as a whole

Each step lives in its own module (`merge`, `gguf`, `llamacpp`, `ollama`); this one only runs them in
order. Every input and option is checked before the first byte is written, and the export folder is
written as a set: it is built beside OUT_DIR and renamed into place, so an interrupted or failed run
leaves the previous export as it was, and a finished one never mixes old and new files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcourse import llamacpp, merge, ollama
from ftcourse.atomic import OutputError, atomic_folder, atomic_output, check_output_file
from ftcourse.gguf import ExportError, check_model_dir, write_gguf

__all__ = ["DEFAULT_QUANTS", "MANIFEST", "ExportError", "ExportResult", "atomic_output", "export_pipeline"]

DEFAULT_QUANTS = ("f16", "q8_0", "Q4_K_M")
MANIFEST = "export-manifest.json"  # what the folder holds; its presence marks an ftcourse export
OLLAMA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*(:[A-Za-z0-9._-]+)?")


@dataclass
class ExportResult:
    """Where export_pipeline put things, what it skipped and why, and what the reader should know."""

    hf_dir: Path
    gguf_files: dict[str, Path]
    modelfile: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    ollama_model: str | None = None
    ollama_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> dict[str, int]:
        """File size in bytes per GGUF type."""
        return {quant: path.stat().st_size for quant, path in self.gguf_files.items()}

    def table(self) -> str:
        """A small text table of files and sizes, for printing."""
        rows = [
            f"{quant:>9}  {size / 2**20:8.2f} MiB  {self.gguf_files[quant]}"
            for quant, size in self.sizes.items()
        ]
        rows += [f"{quant:>9}  skipped: {why}" for quant, why in self.skipped.items()]
        if self.modelfile:
            rows.append(f"{'Modelfile':>9}  {self.modelfile}")
        if self.ollama_model or self.ollama_error:
            rows.append(f"{'ollama':>9}  {self.ollama_model or 'not registered: ' + str(self.ollama_error)}")
        rows += [f"{'note':>9}  {note}" for note in self.notes]
        return "\n".join(rows)


def _check_source(model_or_dir: Any, tokenizer: Any, base_model_dir: str | os.PathLike | None) -> None:
    """Raise ExportError unless the model (object, model folder or adapter folder) can be exported."""
    if not isinstance(model_or_dir, (str, os.PathLike)):
        if tokenizer is None:
            raise ExportError(
                "Exporting a model object needs its tokenizer: "
                "export_pipeline(model, out_dir, tokenizer=tok)."
            )
        return
    path = Path(model_or_dir).expanduser()
    if merge.is_adapter_dir(path):
        merge.read_adapter_config(path)
        if base_model_dir is not None:
            try:
                check_model_dir(base_model_dir)
            except ExportError as error:
                raise ExportError(f"The --base folder cannot be used: {error}") from error
    else:
        check_model_dir(path)  # before any work, fail if the folder cannot be exported


def check_out_dir(out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()) -> Path:
    """OUT_DIR as a Path after checking it can take an export; raises ExportError saying why not."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"The output folder {out_dir} is a file; give a folder name.")
    for source in sources:
        source = Path(source).expanduser().resolve()
        if source == out_dir.resolve() or out_dir.resolve() in source.parents:
            raise ExportError(
                f"The model folder {source} lies inside the output folder {out_dir}: choose another."
            )
    if out_dir.is_dir():
        entries = sorted(p.name for p in out_dir.iterdir())
        if entries and MANIFEST not in entries:
            raise ExportError(
                f"{out_dir} already holds {', '.join(entries[:4])}{' ...' if len(entries) > 4 else ''} and "
                f"is not an earlier ftcourse export. The export replaces its folder as a whole: choose a "
                f"new or empty folder."
            )
    try:
        check_output_file(out_dir / MANIFEST)
    except OutputError as error:
        raise ExportError(str(error)) from error
    return out_dir


def _prepare_hf_dir(
    model_or_dir: Any, stage: Path, tokenizer: Any, base_model_dir: str | os.PathLike | None
) -> tuple[Path, list[str]]:
    """A plain (merged) Hugging Face folder: the given one, or one saved as stage/hf; and notes."""
    model, notes = model_or_dir, []
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = Path(model_or_dir).expanduser()
        if not merge.is_adapter_dir(path):
            return path, notes  # checked by _check_source; written as GGUF directly
        # shard by shard in the base's dtype (peak: a few shards, so a 70B fits in 128 GB); adapters
        # the streaming merge refuses (DoRA, embeddings) are merged in memory, with a note
        return merge.merge_into_folder(path, stage / "hf", base_model_dir)
    return merge.save_merged(model, tokenizer, stage / "hf"), notes


def _write_manifest(stage: Path, source: Any, quants: Sequence[str]) -> None:
    """Record every file the export folder holds, with its size, in MANIFEST."""
    files = {str(p.relative_to(stage)): p.stat().st_size for p in sorted(stage.rglob("*")) if p.is_file()}
    source = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    manifest = {"written_by": "ftcourse export", "source": source, "quants": list(quants), "files": files}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def export_pipeline(
    model_or_dir: Any,
    out_dir: str | os.PathLike,
    quants: Sequence[str] = DEFAULT_QUANTS,
    *,
    tokenizer: Any = None,
    base_model_dir: str | os.PathLike | None = None,
    ollama_name: str | None = None,
    system_prompt: str | None = None,
    progress: bool = True,
) -> ExportResult:
    """Merge (if PEFT) -> HF folder -> GGUF f16 -> q8_0 -> Q4_K_M -> Modelfile -> Ollama; what was written."""
    from tqdm.auto import tqdm

    # 1. Every option and input is checked before any work.
    gguf_types = list(dict.fromkeys(["f16", *(llamacpp.check_quant_type(q) for q in quants)]))
    if ollama_name is not None and not OLLAMA_NAME.fullmatch(ollama_name):
        raise ExportError(f"{ollama_name!r} is not an Ollama model name (letters, digits, . _ - / and :tag).")
    if system_prompt:
        try:
            ollama.modelfile_string(system_prompt, "the system prompt")
        except ollama.ModelfileError as error:
            raise ExportError(str(error)) from error
    _check_source(model_or_dir, tokenizer, base_model_dir)
    sources = [model_or_dir] if isinstance(model_or_dir, (str, os.PathLike)) else []
    out_dir = check_out_dir(out_dir, sources + ([base_model_dir] if base_model_dir else []))

    bar = tqdm(total=len(gguf_types) + 2 + bool(ollama_name), desc="export", disable=not progress)
    skipped = {}
    # 2. The folder is built beside out_dir and replaces it only when every file is written.
    with atomic_folder(out_dir) as stage:
        bar.set_postfix_str("merge / save HF folder")
        hf_dir, notes = _prepare_hf_dir(model_or_dir, stage, tokenizer, base_model_dir)
        bar.update()
        written: dict[str, Path] = {}
        for quant in gguf_types:
            bar.set_postfix_str(quant)
            path = stage / f"model-{quant}.gguf"
            if quant in ("f32", "f16", "q8_0"):
                written[quant] = write_gguf(hf_dir, path, quant, name=out_dir.name)
            elif llamacpp.llama_cpp_available():
                written[quant] = llamacpp.quantize_gguf(written["f16"], path, quant, on_wait=bar.refresh)
            else:
                skipped[quant] = f"llama-cpp-python is not installed ({llamacpp.LLAMA_CPP_INSTALL})"
            bar.update()
        # The Modelfile points at q8_0 when there is one: on small models Q4_K_M visibly changes the output.
        bar.set_postfix_str("Modelfile")
        served = written.get("q8_0", written["f16"])
        ollama.write_modelfile(stage / "Modelfile", served, system=system_prompt)
        _write_manifest(stage, model_or_dir, list(written))
        bar.update()

    def final(path: Path) -> Path:
        return out_dir / path.relative_to(stage) if path.is_relative_to(stage) else path

    result = ExportResult(
        hf_dir=final(hf_dir),
        gguf_files={quant: final(path) for quant, path in written.items()},
        modelfile=out_dir / "Modelfile",
        skipped=skipped,
        notes=notes,
    )
    if ollama_name:
        bar.set_postfix_str("ollama")
        try:
            result.ollama_model = ollama.register_with_ollama(
                final(served), ollama_name, system=system_prompt
            )
        except ollama.OllamaUnavailable as error:
            result.ollama_error = str(error)  # the files are written; only the registration is missing
        bar.update()
    bar.close()
    return result
