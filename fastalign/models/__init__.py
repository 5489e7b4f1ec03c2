"""Models: the bundled tiny model and tokenizer, scalar (reward/value) heads, loading helpers."""

from fastalign.models.heads import ScalarHeadModel
from fastalign.models.loading import load_model, load_tokenizer, save_model
from fastalign.models.tiny import tiny_model, tiny_tokenizer

__all__ = ["ScalarHeadModel", "load_model", "load_tokenizer", "save_model", "tiny_model", "tiny_tokenizer"]
