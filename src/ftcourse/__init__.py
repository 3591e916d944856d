"""ftcourse: the package behind the executable book on fine-tuning large language models."""

__version__ = "0.1.0"
