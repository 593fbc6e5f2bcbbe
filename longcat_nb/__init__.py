"""longcat-nb: notebooks and a package for LoRA fine-tuning LongCat-Video."""

__version__ = "0.1.0"
