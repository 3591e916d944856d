"""ftcourse: the package behind the executable book on fine-tuning large language models."""

import logging
import warnings

__version__ = "0.1.0"

# tqdm asks for ipywidgets in notebooks; its text bars work without them, so the hint is noise.
warnings.filterwarnings("ignore", message="IProgress not found")
# Deprecations raised inside transformers/TRL by their own calls (renamed to activation checkpointing);
# nothing in ftcourse uses the old names, and a reader cannot act on them.
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing.*")
# bitsandbytes looks for optional hub-hosted CPU kernels; its built-in CPU path works without them.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
