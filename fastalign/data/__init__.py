"""Data: instruction and preference formats, tokenisation/collation, the bundled synthetic task."""

from fastalign.data.formats import DataFormatError, describe, kind_of, load_records
from fastalign.data.synthetic import Oracle, SyntheticTask

__all__ = ["DataFormatError", "Oracle", "SyntheticTask", "describe", "kind_of", "load_records"]
