"""Corpus configuration: where images come from and how to read them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rayoodkd.data.builtin import BUILTIN_SOURCES, BUILTIN_SPLITS

Format = Literal["auto", "builtin", "image_folder", "parquet", "cifar", "idx", "numpy"]
FORMATS: tuple[str, ...] = Format.__args__
# Formats whose ``split`` selects part of the source; other formats ignore ``split``.
SPLITS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "builtin": BUILTIN_SPLITS,
    "cifar": ("train", "test"),
    "idx": ("train", "test"),
}


def check_split(fmt: str, split: str | None) -> None:
    """Raise ``ValueError`` naming ``split`` and its allowed values if ``split`` is invalid for ``fmt``."""
    allowed = SPLITS_BY_FORMAT.get(fmt)
    if split is not None and allowed is not None and split not in allowed:
        raise ValueError(f"split: {split!r} is not valid for format {fmt!r}; allowed: {', '.join(allowed)}")


class CorpusConfig(BaseModel):
    """An image corpus: a builtin set name or a path/URI (local, ``file://``, ``s3://``, ``gs://``).

    ``format="auto"`` detects: builtin names -> builtin; ``*.parquet``, a glob, or a directory of parquet
    files (or hive partitions) -> parquet; a CIFAR python archive (``.tar.gz``/``.tgz``/``.tar``) or its
    extracted directory -> cifar; ``*-idx3-ubyte[.gz]`` files or a directory holding them -> idx;
    ``.npy``/``.npz`` -> numpy; anything else -> image_folder. ``split`` defaults to "train" for builtin,
    cifar and idx directories. ``num_images`` is how many images a generated builtin set renders, and an
    upper limit for every other source. With ``labelled=False`` every label is -1.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1)
    format: Format = "auto"
    split: str | None = None
    image_column: str = Field(default="image", min_length=1)
    label_column: str | None = "label"
    num_images: int | None = Field(default=None, gt=0)
    labelled: bool = True

    @model_validator(mode="after")
    def _check(self) -> CorpusConfig:
        if self.format == "builtin" and self.source not in BUILTIN_SOURCES:
            raise ValueError(
                f"source: unknown builtin set {self.source!r}; allowed: {', '.join(BUILTIN_SOURCES)}"
            )
        is_builtin = self.format == "builtin" or (self.format == "auto" and self.source in BUILTIN_SOURCES)
        check_split("builtin" if is_builtin else self.format, self.split)
        return self
