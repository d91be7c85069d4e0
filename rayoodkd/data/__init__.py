"""Data layer: builtin offline image sets, corpus readers on Ray Data, and batch decoding.

The Ray-based readers are imported on first use, so ``decode_batch`` and the builtin sets work without Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from rayoodkd.data.builtin import BUILTIN_SOURCES, builtin_arrays, materialize_builtin
from rayoodkd.data.config import Corpus, CorpusConfig, corpus_members, describe_corpus
from rayoodkd.data.decode import decode_batch

_READERS = ("class_names_of", "corpus_summary", "load_corpus", "resolve_format")

__all__ = [
    "BUILTIN_SOURCES",
    "Corpus",
    "CorpusConfig",
    "builtin_arrays",
    "class_names_of",
    "corpus_members",
    "corpus_summary",
    "decode_batch",
    "describe_corpus",
    "load_corpus",
    "materialize_builtin",
    "resolve_format",
]


def __getattr__(name: str) -> Any:
    if name in _READERS:
        return getattr(importlib.import_module("rayoodkd.data.readers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
