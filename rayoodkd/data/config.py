"""Corpus configuration: where images come from, how to read them, and which part of them to use."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from rayoodkd.data.builtin import BUILTIN_SOURCES, BUILTIN_SPLITS

Format = Literal["auto", "builtin", "image_folder", "parquet", "cifar", "idx", "numpy", "imagenet_pickle"]
FORMATS: tuple[str, ...] = Format.__args__
# Formats whose ``split`` selects part of the source; other formats ignore ``split``.
SPLITS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "builtin": BUILTIN_SPLITS,
    "cifar": ("train", "test"),
    "idx": ("train", "test"),
    "imagenet_pickle": ("train", "val"),
}
# Formats made of separate train/test files, one of which ``archive_split`` picks under a hash split.
ARCHIVE_FORMATS: tuple[str, ...] = ("cifar", "idx")
# The parts of a hash split, in the order of ``split_fractions``.
SPLIT_PARTS: tuple[str, ...] = ("train", "val", "test")
SplitFractions = tuple[float, float, float]
SPLIT_FRACTIONS_TOLERANCE = 1e-6


def is_glob(path: str) -> bool:
    """Whether a source path is a glob pattern (read as parquet files) rather than one file or folder."""
    return any(char in path for char in "*?[")


def check_split(fmt: str, split: str | None) -> None:
    """Raise ``ValueError`` naming ``split`` and its allowed values if ``split`` is invalid for ``fmt``."""
    allowed = SPLITS_BY_FORMAT.get(fmt)
    if split is not None and allowed is not None and split not in allowed:
        raise ValueError(f"split: {split!r} is not valid for format {fmt!r}; allowed: {', '.join(allowed)}")


def check_archive_split(fmt: str, archive_split: str | None) -> None:
    """Raise ``ValueError`` naming ``archive_split`` if it is set for a format without archive parts."""
    if archive_split is not None and fmt not in ARCHIVE_FORMATS:
        raise ValueError(
            f"archive_split: only {' and '.join(ARCHIVE_FORMATS)} sources have archive parts, "
            f"not format {fmt!r}"
        )


class CorpusConfig(BaseModel):
    """An image corpus: a builtin set name or a path/URI (local, ``file://``, ``s3://``, ``gs://``).

    ``format="auto"`` detects: builtin names -> builtin; ``*.parquet``, a glob, or a directory of parquet
    files (or hive partitions) -> parquet; a CIFAR python archive (``.tar.gz``/``.tgz``/``.tar``) or its
    extracted directory -> cifar; ``*-idx3-ubyte[.gz]`` files or a directory holding them -> idx; downsampled
    ImageNet batches (``train_data_batch_<n>``/``val_data``, pickled or ``.npz``) or a directory holding them,
    and any other ``*.pkl``/``*.pickle`` file not named like a CIFAR-10 batch (e.g. KD3's ImageNet-32
    pickle) -> imagenet_pickle; ``.npy``/``.npz`` -> numpy; anything else -> image_folder. ``split``
    defaults to "train" for builtin, cifar, idx and imagenet_pickle sources. ``num_images`` is how many
    images a generated builtin set renders, and an upper limit for every other source. With
    ``labelled=False`` every label is -1.

    Hash split, for any source: with ``split_fractions=(train, val, test)`` (each >= 0, summing to 1) the
    source's rows are divided into three disjoint parts and ``split`` (required: train, val or test) picks
    one. A row's part comes from a blake2b hash, keyed by ``split_seed``, of its content (the encoded image
    bytes, or the raw pixel bytes of array sources) mapped to [0, 1) and cut at the cumulative fractions.
    So the split is the same on every run and machine, needs no shuffle (it streams over any number of rows),
    part sizes match the fractions up to sampling noise, and identical images (the same bytes) always land in
    the same part: duplicates never leak across parts. (Builtin sets are cached as PNG files encoded by the
    installed Pillow, whose bytes can change between Pillow releases (its zlib): their parts are those of
    the recorded results, made with Pillow 13.0.0, wherever Pillow writes the same bytes. Hashing decoded
    pixels instead would have moved every recorded builtin split.) The hash split reads the whole source:
    every image of
    a builtin set (its "all" part; a generated set renders ``num_images`` first), and for cifar/idx the
    archive part ``archive_split`` (default "train"; allowed only under a hash split). ``num_images`` then
    caps the chosen part. Without ``split_fractions`` every key keeps the meaning above.

    Per-class cap, for any labelled source (a small labelled training set, e.g. 10 images per class): with
    ``per_class=k`` each class keeps its k images of smallest blake2b content hash keyed by
    ``per_class_seed`` (the hash of the split above; all of a class's images when it has at most k). The
    choice is the same on every run and machine, independent of row order, and nested: the images kept at
    k are among those kept at any larger k with the same seed. Rows with an unknown label (< 0) are dropped.
    Identical images share a hash, so a class keeps more than k only when its k-th image has exact copies.
    The cap applies after the hash split and before ``num_images``; the kept rows stay in source order.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1)
    format: Format = "auto"
    split: str | None = None
    image_column: str = Field(default="image", min_length=1)
    label_column: str | None = "label"
    num_images: int | None = Field(default=None, gt=0)
    labelled: bool = True
    split_fractions: SplitFractions | None = None
    split_seed: int = Field(default=0, ge=0, lt=2**64)
    archive_split: Literal["train", "test"] | None = None
    per_class: int | None = Field(default=None, gt=0)
    per_class_seed: int = Field(default=0, ge=0, lt=2**64)

    @property
    def is_builtin(self) -> bool:
        """Whether the source is a builtin set (named with ``format`` builtin or auto)."""
        return self.format == "builtin" or (self.format == "auto" and self.source in BUILTIN_SOURCES)

    @property
    def source_split(self) -> str | None:
        """The part of the source that is read, before any hash split (None: the format's default)."""
        if self.split_fractions is None:
            return self.split
        return "all" if self.is_builtin else self.archive_split

    @field_validator("split_fractions")
    @classmethod
    def _check_fractions(cls, fractions: SplitFractions | None) -> SplitFractions | None:
        # ``not f >= 0`` also rejects NaN, which every comparison fails.
        if fractions is not None and (
            any(not f >= 0 for f in fractions)
            or not math.isclose(sum(fractions), 1.0, rel_tol=0.0, abs_tol=SPLIT_FRACTIONS_TOLERANCE)
        ):
            raise ValueError(f"need (train, val, test), each >= 0, summing to 1; got {fractions}")
        return fractions

    @model_validator(mode="after")
    def _check(self) -> CorpusConfig:
        if self.format == "builtin" and self.source not in BUILTIN_SOURCES:
            raise ValueError(
                f"source: unknown builtin set {self.source!r}; allowed: {', '.join(BUILTIN_SOURCES)}"
            )
        if self.per_class is not None and not self.labelled:
            raise ValueError("per_class: needs a labelled corpus (labelled is false)")
        fmt = "builtin" if self.is_builtin else self.format
        if self.split_fractions is None:
            if self.archive_split is not None:
                raise ValueError(
                    "archive_split: only used with split_fractions; without them split picks the archive part"
                )
            check_split(fmt, self.split)
            return self
        if self.split not in SPLIT_PARTS:
            raise ValueError(
                f"split: must be one of {', '.join(SPLIT_PARTS)} when split_fractions is set, "
                f"got {self.split!r}"
            )
        if fmt != "auto":
            check_archive_split(fmt, self.archive_split)
        return self


_UNION_MEMBERS = TypeAdapter(list[CorpusConfig])


def _one_corpus_or_union(
    value: Any, _handler: ValidatorFunctionWrapHandler
) -> CorpusConfig | list[CorpusConfig]:
    # Validated here rather than as a pydantic union, whose errors would name a branch of the union
    # ("data.ood.list[...]") instead of the member (``data.ood.1.source``).
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError("a union needs one or more corpora")
        return _UNION_MEMBERS.validate_python(list(value))
    return CorpusConfig.model_validate(value)


Corpus = Annotated[CorpusConfig | list[CorpusConfig], WrapValidator(_one_corpus_or_union)]
"""One corpus, or a union: a list of corpora read as one (each member with all its own keys, applied to it
alone), in YAML ``ood: [{source: letters}, {source: /data/imgs, num_images: 500}]``."""


def corpus_members(corpus: Corpus) -> list[CorpusConfig]:
    """The corpora a corpus is made of: itself, or a union's members in order."""
    return list(corpus) if isinstance(corpus, list) else [corpus]


def describe_corpus(corpus: Corpus) -> str:
    """Its sources and splits for messages: ``mnist5k (test)``, ``letters + /data/imgs`` for a union."""
    return " + ".join(
        member.source + (f" ({member.split})" if member.split else "") for member in corpus_members(corpus)
    )
