"""The embedded model and its task world: a tiny Llama that ships inside the package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def model_dir() -> Path:
    """The folder of the embedded model (config, safetensors weights, tokenizer, chat template)."""
    path = Path(str(files("ftcourse.toy") / "weights"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"The embedded model is missing from {path}. Reinstall ftcourse, or rebuild it with "
            "`python -m ftcourse.toy.pretrain --out <that folder>`."
        )
    return path
