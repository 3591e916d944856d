"""Deployment pipeline: adapter -> merged Hugging Face folder -> GGUF files -> Modelfile -> Ollama.

    check everything -> merge.merge_into_folder (an adapter folder: shard by shard) or merge.save_merged
    (a model in memory) -> gguf.write_gguf (f16, q8_0) -> llamacpp.quantize_gguf
    (Q4_K_M) -> ollama.write_modelfile -> manifest -> the folder replaces OUT_DIR as a whole

Each step lives in its own module (`merge`, `gguf`, `llamacpp`, `ollama`); this one only runs them in
order. Every input and option is checked before the first byte is written, and the export folder is
written as a set: it is built beside OUT_DIR and renamed into place, so an interrupted or failed run
leaves the previous export as it was, and a finished one never mixes old and new files. One export at a
time writes a folder (a lock file beside it); the next run removes hidden staging folders that a killed
run left behind, and recovers an earlier export that a crash between the two renames left hidden.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
        if base_model_dir is not None:
            raise ExportError(
                f"--base is for an adapter folder, but {path} is a plain model folder (it has no "
                f"{merge.ADAPTER_CONFIG}), so the base would be ignored. Drop --base, or give the adapter "
                f"folder."
            )
        check_model_dir(path)  # before any work, fail if the folder cannot be exported


def resolve_out_dir(out_dir: str | os.PathLike) -> Path:
    """OUT_DIR as an absolute path; a symbolic link is followed, so the link keeps pointing at the export."""
    given = Path(out_dir).expanduser()
    if given.is_symlink():
        target = given.resolve()
        if not target.exists():
            raise ExportError(
                f"The output folder {given} is a symbolic link to {os.readlink(given)}, which does not "
                f"exist: create that folder, or remove the link and give a folder name."
            )
        given = target  # the export replaces the target folder; the link stays and points at it
    absolute = Path(os.path.abspath(given))
    here = Path.cwd()
    if not absolute.name or absolute == here or absolute in here.parents:
        raise ExportError(
            f"The output folder {str(out_dir)!r} is the current folder or one above it. The export replaces "
            f"its folder as a whole (renaming a new one into place): give a folder name such as ./export."
        )
    return absolute


def check_out_dir(out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()) -> Path:
    """OUT_DIR as a Path after checking it can take an export; raises ExportError saying why not."""
    out_dir = resolve_out_dir(out_dir)
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


@contextmanager
def export_lock(out_dir: Path) -> Iterator[None]:
    """Hold the lock file beside out_dir for one export; raises ExportError while another export holds it."""
    lock_path = out_dir.with_name(f".{out_dir.name}.export-lock")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ExportError(
                    f"Another export (process {holder}) is writing {out_dir} right now. Wait for it to "
                    f"finish, or export into another folder."
                ) from None
            try:  # the holder before us may have removed the file after we opened it: lock the live one
                if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as error:
        raise ExportError(f"Cannot create the lock file {lock_path}: {error.strerror}.") from error
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def _size_mib(path: Path) -> float:
    """Bytes under path, in MiB."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def recover_stale_staging(out_dir: Path) -> list[str]:
    """Remove the hidden staging folders killed exports left beside out_dir; restore a lost export. Notes."""
    # atomic_folder builds .NAME.PID.partial, moves the old export to .NAME.PID.old, renames the stage to
    # NAME and deletes .old. kill -9 leaves .partial (as big as the model); a crash between the two renames
    # leaves the old export only as .old. Called under export_lock, so no live export owns these.
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.\d+\.(partial|old)")
    stale = sorted(p for p in out_dir.parent.iterdir() if pattern.fullmatch(p.name))
    notes = []
    olds = [p for p in stale if p.name.endswith(".old") and (p / MANIFEST).is_file()]
    if olds and not out_dir.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, out_dir)
        stale.remove(newest)
        notes.append(f"recovered the earlier export from {newest.name}, left by an export that stopped "
                     f"between its two renames")  # fmt: skip
    for path in stale:
        size = _size_mib(path)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        notes.append(f"removed {path.name} ({size:.1f} MiB), left by an interrupted export")
    return notes


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
    sources += [base_model_dir] if base_model_dir else []
    out_dir = check_out_dir(out_dir, sources)
    with export_lock(out_dir):
        cleanup = recover_stale_staging(out_dir)
        check_out_dir(out_dir, sources)  # again: a recovered export is now in place
        try:
            result = _export_locked(
                model_or_dir, out_dir, gguf_types, tokenizer, base_model_dir, system_prompt, progress
            )
        except OSError as error:  # a full disk, a folder removed under us: the earlier export is untouched
            full = " The disk is full: free space and run again." if error.errno == errno.ENOSPC else ""
            raise ExportError(
                f"Writing the export failed: {error.strerror or error}"
                f"{f' ({error.filename})' if error.filename else ''}.{full} {out_dir} is as it was before "
                f"the run."
            ) from error
    result.notes[:0] = cleanup
    if ollama_name:
        try:
            result.ollama_model = ollama.register_with_ollama(
                result.gguf_files.get("q8_0", result.gguf_files["f16"]), ollama_name, system=system_prompt
            )
        except ollama.OllamaUnavailable as error:
            result.ollama_error = str(error)  # the files are written; only the registration is missing
    return result


def _export_locked(
    model_or_dir: Any,
    out_dir: Path,
    gguf_types: list[str],
    tokenizer: Any,
    base_model_dir: str | os.PathLike | None,
    system_prompt: str | None,
    progress: bool,
) -> ExportResult:
    """Steps 2 to 6 of export_pipeline, with out_dir checked and locked: the folder, written as a set."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(gguf_types) + 2, desc="export", disable=not progress)
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

    bar.close()
    return ExportResult(
        hf_dir=final(hf_dir),
        gguf_files={quant: final(path) for quant, path in written.items()},
        modelfile=out_dir / "Modelfile",
        skipped=skipped,
        notes=notes,
    )
