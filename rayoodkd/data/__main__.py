"""``python -m rayoodkd.data``: materialise or inspect an image corpus (or a union of several); show or
clear the local cache."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, NoReturn

import numpy as np
from pydantic import ValidationError

from rayoodkd.cli import prog
from rayoodkd.data.builtin import BUILTIN_SOURCES, BUILTIN_SPLITS, encode_png
from rayoodkd.data.config import FORMATS, Corpus, CorpusConfig, corpus_members

if TYPE_CHECKING:  # Ray (rayoodkd.data.readers) is imported when a command runs, so --help answers at once
    import ray.data

_EPILOG = f"""\
SOURCE is a builtin set ({", ".join(BUILTIN_SOURCES)})
or a local path / file:// / s3:// / gs:// URI of: an image folder (class subfolders give labels),
parquet shards with an encoded-image column, a CIFAR-10/100 python archive (.tar.gz) or its
extracted directory, MNIST IDX files (*-images-idx3-ubyte[.gz]), or a .npy/.npz array file.
--format auto detects which. Several SOURCEs are read as one corpus (their union), each with the
options given.
Splits: builtin sets take {"/".join(BUILTIN_SPLITS)} (default train); CIFAR and IDX directories take
train/test (default train).

examples:
  python -m rayoodkd.data materialize letters --out /data/letters --num-images 50000 --seed 1
  python -m rayoodkd.data materialize ~/photos --out s3://bucket/photos-32 --image-size 32 --channels 3
  python -m rayoodkd.data inspect cifar-10-python.tar.gz --split test
  python -m rayoodkd.data materialize letters textures ~/photos --out /data/ood-mix --num-images 5000
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-logs",
        action="store_true",
        help="show Ray's own logging (start-up, Ray Data execution plans); off by default",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        nargs="+",
        help="builtin set name, or a path/URI of a corpus; several are read as their union",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        metavar="FORMAT",
        help=f"{', '.join(FORMATS)} (default: auto)",
    )
    p.add_argument(
        "--split",
        default=None,
        metavar="SPLIT",
        help="split to read (builtin: train/val/test/all; cifar, idx: train/test)",
    )
    p.add_argument(
        "--num-images",
        type=_positive_int,
        metavar="N",
        default=None,
        help="images to render for generated builtin sets (default 20000); an upper limit for other sources",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="rendering seed of generated builtin sets (default: 0)",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=28,
        metavar="PX",
        help="output side in pixels (default: 28)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=1,
        choices=(1, 3),
        metavar="{1,3}",
        help="1 = gray, 3 = RGB (default: 1)",
    )
    p.add_argument(
        "--image-column",
        default="image",
        metavar="COL",
        help="parquet column with encoded images (default: image)",
    )
    p.add_argument(
        "--label-column",
        default="label",
        metavar="COL",
        help="parquet column with int labels (default: label)",
    )
    p.add_argument("--unlabelled", action="store_true", help="ignore labels (every label becomes -1)")
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="cache for builtin sets (default: $RAYOODKD_CACHE or ~/.cache)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser with the ``materialize``, ``inspect`` and ``cache`` subcommands."""
    parser = _Parser(
        prog=prog("data"),
        description="Materialise image corpora as parquet shards, or inspect them, through Ray Data.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{materialize,inspect,cache}")
    mat = sub.add_parser(
        "materialize",
        help="decode, resize and write a corpus as parquet shards (image: PNG bytes, label: int64)",
        description="Decode and resize a corpus, skip corrupt images, and write parquet shards "
        "(columns image: PNG bytes, label: int64). An existing output directory is overwritten.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_corpus_args(mat)
    mat.add_argument("--out", required=True, metavar="DIR", help="output directory or URI (overwritten)")
    mat.add_argument(
        "--shard-rows", type=_positive_int, default=10000, metavar="N", help="rows per shard (default: 10000)"
    )
    insp = sub.add_parser(
        "inspect",
        help="print rows, corrupt images and the label histogram of a corpus",
        description="Read and decode a corpus and print rows, corrupt images and the label histogram.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_corpus_args(insp)
    cache = sub.add_parser(
        "cache",
        help="show what the local cache holds, or clear its decoded corpora",
        description="Show the cache directory's parts (builtin sets as parquet, decoded corpora, "
        "teachers) with their entries and sizes; --clear-decoded deletes the decoded corpora, which the "
        "next launch of each corpus writes again.",
    )
    cache.add_argument("--cache-dir", default=None, help="default: $RAYOODKD_CACHE or ~/.cache/rayoodkd")
    cache.add_argument("--clear-decoded", action="store_true", help="delete every decoded corpus")
    return parser


def _cache(args: argparse.Namespace) -> None:
    from rayoodkd.data.builtin import cache_root
    from rayoodkd.data.decoded import cache_usage, clear_decoded

    if args.clear_decoded:
        entries, size = clear_decoded(args.cache_dir)
        print(f"deleted {entries} decoded corpora ({size / 2**20:.1f} MB)")
    print(f"cache: {cache_root(args.cache_dir)}")
    for part, (entries, size) in cache_usage(args.cache_dir).items():
        print(f"  {part:<10} {entries:>6} entries {size / 2**20:>10.1f} MB")


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _encode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decoded uint8 CHW images -> PNG bytes (gray or RGB)."""
    pixels = np.asarray(batch["image"], dtype=np.uint8)
    pixels = pixels[:, 0] if pixels.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)
    encoded = np.empty(len(pixels), dtype=object)
    for i, img in enumerate(pixels):
        encoded[i] = encode_png(img)
    return {"image": encoded, "label": batch["label"], "corrupt": batch["corrupt"]}


def _drop_corrupt(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = ~np.asarray(batch["corrupt"], dtype=bool)
    return {"image": batch["image"][keep], "label": batch["label"][keep]}


def _materialize(ds: ray.data.Dataset, args: argparse.Namespace) -> None:
    import pyarrow.fs as pafs

    from rayoodkd.data.readers import corpus_summary, filesystem_and_path

    encoded = ds.map_batches(_encode_batch, batch_format="numpy").materialize()
    summary = corpus_summary(encoded)
    kept = summary["rows"] - summary["corrupt"]
    encoded.map_batches(_drop_corrupt, batch_format="numpy").write_parquet(
        args.out, mode="overwrite", min_rows_per_file=args.shard_rows, max_rows_per_file=args.shard_rows
    )
    fs, path = filesystem_and_path(args.out)
    shards = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    n_shards = sum(1 for s in shards if s.is_file and s.base_name.endswith(".parquet"))
    print(f"wrote {kept} images in {n_shards} parquet shards to {args.out}")
    print(f"skipped {summary['corrupt']} corrupt images")


def _inspect(ds: ray.data.Dataset, corpus: Corpus, formats: str) -> None:
    from rayoodkd.data.readers import class_names_of, corpus_summary

    summary = corpus_summary(ds)
    names = class_names_of(corpus) or []
    print(f"source: {formats}")
    print(f"rows: {summary['rows']}")
    print(f"corrupt: {summary['corrupt']}")
    print(f"labelled: {summary['labelled']}")
    print("label histogram (intact images):")
    for label, count in summary["label_counts"].items():
        name = names[label] if 0 <= label < len(names) else ("unlabelled" if label < 0 else "")
        print(f"  {label:>5} {name:<12} {count}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (bad arguments exit with 2 and a one-line message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cache":
        _cache(args)
        return 0
    from rayoodkd.data.readers import load_corpus, resolve_format

    try:
        members = [
            CorpusConfig(
                source=source,
                format=args.format,
                split=args.split,
                image_column=args.image_column,
                label_column=args.label_column,
                num_images=args.num_images,
                labelled=not args.unlabelled,
            )
            for source in args.source
        ]
        corpus: Corpus = members[0] if len(members) == 1 else members
        formats = " + ".join(f"{m.source} (format {resolve_format(m)})" for m in corpus_members(corpus))
        print(f"reading {formats}", flush=True)
    except ValidationError as err:
        parser.error(_one_line(err))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    from rayoodkd.raystart import start_ray_for_reads

    start_ray_for_reads(args.ray_logs, progress_bars=sys.stderr.isatty())
    try:
        ds = load_corpus(
            corpus,
            image_size=args.image_size,
            channels=args.channels,
            seed=args.seed,
            cache_dir=args.cache_dir,
        )
    except ValidationError as err:
        parser.error(_one_line(err))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.command == "materialize":
        _materialize(ds, args)
    else:
        _inspect(ds, corpus, formats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
