"""Teachers: train one on a labelled set, write a self-describing checkpoint, load it frozen.

    python -m rayoodkd.teacher --out teacher.pt                      # LeNet-5 on MNIST-5k (the demo recipe)
    python -m rayoodkd.teacher --out t.pt arch=resnet8 epochs=30 train.source=/data/cifar10 ...
    python -m rayoodkd.teacher --show teacher.pt
    python -m rayoodkd.teacher import --weights resnet18.pth --out t.pt arch=torchvision:resnet18 \
        num_classes=1000 image_size=224 channels=3 mean=[0.485,0.456,0.406] std=[0.229,0.224,0.225]
    python -m rayoodkd.teacher import --weights net.pt --out t.pt arch=my_models:MyNet kwargs.width=64 \
        num_classes=10 image_size=32 channels=3 mean=[..] std=[..] test.source=/data/cifar10 test.split=test

A teacher checkpoint (``rayoodkd.teacher_io``) holds the architecture, class count, input size and channels,
the normalisation the teacher was trained with, its validation and test accuracy, the recipe, and a content
hash of its weights. When a run's config gives no ``teacher.checkpoint``, the recipe is trained once and
cached under the cache directory, keyed by the recipe. ``import`` wraps a state dict written by another
project (plain ``state_dict``, or a checkpoint dict holding one under ``state_dict``/``model``) for any
``arch`` that ``build_classifier`` builds: a registered name, ``torchvision:NAME``, ``timm:NAME`` or the
user's ``module.path:ClassName``; with ``test.*`` keys (the recipe's corpus keys) it scores the teacher on
that labelled set and records the top-1/top-5 (docs/teachers.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from rayoodkd.cli import prog
from rayoodkd.config import ConfigError, Section, TeacherConfig, TeacherRecipe, apply_overrides
from rayoodkd.data.builtin import cache_root
from rayoodkd.data.config import Corpus, describe_corpus
from rayoodkd.errors import first_line, one_line

# torch and the model zoo load when a teacher is trained, imported or read, not for --help.
if TYPE_CHECKING:
    from torch import Tensor, nn

    from rayoodkd.teacher_io import TeacherInfo

CHECKPOINT_API = ("TeacherInfo", "load_teacher", "read_teacher", "save_teacher")


def __getattr__(name: str) -> Any:
    """The teacher checkpoint API of ``rayoodkd.teacher_io`` is importable from here too (``from
    rayoodkd.teacher import save_teacher``), loaded on first use so that ``--help`` imports no torch."""
    if name in CHECKPOINT_API:
        import rayoodkd.teacher_io

        return getattr(rayoodkd.teacher_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_tensors(
    corpus: Corpus, image_size: int, channels: int, cache_dir: str | None = None, seed: int = 0
) -> tuple[Tensor, Tensor, int]:
    """A (small) corpus or union read through Ray Data into memory: images in [0, 1], labels, corrupt rows
    skipped."""
    import torch

    from rayoodkd.augment import unit_images
    from rayoodkd.data import load_corpus

    dataset = load_corpus(corpus, image_size=image_size, channels=channels, seed=seed, cache_dir=cache_dir)
    images, labels, corrupt = [], [], 0
    for batch in dataset.iter_torch_batches(batch_size=2048):
        keep = ~batch["corrupt"].bool()
        corrupt += int((~keep).sum())
        images.append(unit_images(batch["image"][keep]))
        labels.append(batch["label"][keep].long())
    if not images:
        raise ValueError(f"corpus {describe_corpus(corpus)} is empty")
    return torch.cat(images), torch.cat(labels), corrupt


def recipe_key(recipe: TeacherRecipe) -> str:
    """The cache key of a recipe: a hash of every field that differs from its default (so adding a
    defaulted field later does not retrain every cached teacher)."""
    text = json.dumps(recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_teacher(
    recipe: TeacherRecipe, out: str | Path, cache_dir: str | None = None, log: Any = print
) -> TeacherInfo:
    """Train ``recipe.arch`` on ``recipe.train``; pick the best epoch on ``recipe.val``; score on ``test``.

    SGD (momentum 0.9, Nesterov, as MosaicKD's ``train_scratch.py``) or Adam (AuG-KD's teachers), with a
    per-iteration cosine schedule; normalised with the training set's statistics or a fixed ``mean``/``std``.
    """
    import torch
    from torch import nn

    from rayoodkd.augment import augment_batch
    from rayoodkd.engine.evaluation import evaluate
    from rayoodkd.engine.streams import tensor_source
    from rayoodkd.models import build_classifier
    from rayoodkd.teacher_io import TeacherInfo, save_teacher

    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    size, channels = recipe.image_size, recipe.channels
    train_x, train_y, skipped = load_tensors(recipe.train, size, channels, cache_dir)
    val_x, val_y, _ = load_tensors(recipe.val, size, channels, cache_dir)
    test_x, test_y, _ = load_tensors(recipe.test, size, channels, cache_dir)
    if int(train_y.min()) < 0 or int(train_y.max()) >= recipe.num_classes:
        raise ValueError(f"teacher.recipe.train: labels must lie in 0..{recipe.num_classes - 1}")
    mean = recipe.mean or tuple(train_x.mean(dim=(0, 2, 3)).tolist())
    std = recipe.std or tuple(train_x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    info = TeacherInfo(
        recipe.arch, recipe.num_classes, channels, size, mean, std, recipe=recipe.model_dump(mode="json")
    )

    def normalize(x: Tensor) -> Tensor:
        return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)

    model = build_classifier(
        recipe.arch, num_classes=recipe.num_classes, in_channels=channels, image_size=size
    )
    if recipe.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
        )
    steps_per_epoch = max(len(train_x) // recipe.batch_size, 1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
    source = tensor_source(train_x, train_y, recipe.batch_size, recipe.seed)
    best_val, best_state = -1.0, None
    log(
        f"teacher: {recipe.arch} on {len(train_x)} images ({skipped} corrupt skipped), {recipe.epochs} epochs"
    )
    started = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        for _ in range(steps_per_epoch):
            batch = source.next_batch()
            x = normalize(augment_batch(batch["image"], recipe.augment, generator))
            loss = nn.functional.cross_entropy(
                model(x), batch["label"], label_smoothing=recipe.label_smoothing
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = evaluate(model, normalize(val_x), val_y)["top1"]
        if val > best_val:
            best_val, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
        log(f"  epoch {epoch + 1:3d}/{recipe.epochs}  loss {loss.item():.4f}  val top-1 {val:6.2f}%")
    model.load_state_dict(best_state)
    test = evaluate(model, normalize(test_x), test_y)
    info.accuracy = {"val": best_val, "test": test["top1"], "test_top5": test["top5"]}
    save_teacher(out, model, info)
    log(
        f"teacher: val {best_val:.2f}%  test {test['top1']:.2f}%  "
        f"({time.perf_counter() - started:.0f} s) -> {out}"
    )
    return info


def ensure_teacher(
    teacher: TeacherConfig,
    cache_dir: str | None = None,
    log: Any = print,
    before_training: Callable[[], None] | None = None,
) -> Path:
    """The teacher checkpoint a run uses: the configured file, or the recipe's cached result (trained now,
    after ``before_training``, if there is none)."""
    from rayoodkd.teacher_io import read_teacher

    if teacher.checkpoint:
        path = Path(teacher.checkpoint).expanduser()
        read_teacher(path)
        return path
    path = cache_root(cache_dir) / "teachers" / f"{teacher.recipe.arch}-{recipe_key(teacher.recipe)}.pt"
    if not path.is_file():
        log(f"teacher: no checkpoint given; training the recipe once (cached at {path})")
        if before_training is not None:
            before_training()
        train_teacher(teacher.recipe, path, cache_dir, log)
    return path


class ImportSpec(Section):
    """What ``import`` needs to know about foreign weights (they carry no such metadata)."""

    arch: str = Field(
        description="a registered name, torchvision:NAME, timm:NAME or module.path:ClassName (your nn.Module)"
    )
    num_classes: int = Field(ge=2)
    image_size: int = Field(ge=8)
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="more constructor arguments (kwargs.width=64), recorded in the file"
    )
    test: Corpus | None = Field(
        None,
        description="a labelled set (or a union: a list of them) to score the imported teacher on "
        "(test.source=..., test.split=test)",
    )

    @field_validator("kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        from rayoodkd.models.classifiers.external import BUILD_ARGUMENTS

        for reserved in BUILD_ARGUMENTS:
            if reserved in kwargs:
                key = {"in_channels": "channels"}.get(reserved, reserved)
                raise ValueError(f"{reserved} is set by the key {key}=...; remove kwargs.{reserved}")
        return kwargs


def _foreign_state_dict(path: Path) -> dict[str, Tensor]:
    import torch
    from torch import Tensor

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # one line, never a traceback
        what = type(error).__name__
        raise ConfigError(f"--weights: {path} is not a tensor-only PyTorch file ({what})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise ConfigError(f"--weights: {path} holds no state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in payload.items()}


def _state_dict_mismatch(error: RuntimeError, model: nn.Module) -> str:
    """``load_state_dict``'s multi-line error as one line, in the keys of the weights file."""
    source_key = getattr(model, "source_key", lambda key: key)
    parts = []
    for line in str(error).splitlines()[1:]:
        line = line.strip()
        keys = [source_key(k) for k in re.findall(r'"([^"]+)"', line)]
        if line.startswith(("Missing key(s)", "Unexpected key(s)")):
            what = "missing" if line.startswith("Missing") else "unexpected"
            more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
            parts.append(f"{what} keys {', '.join(keys[:3])}{more}")
        elif line.startswith("size mismatch for "):
            name, _, detail = line.removeprefix("size mismatch for ").partition(": ")
            shapes = re.findall(r"torch\.Size\(\[[^\]]*\]\)", detail)
            have = f" (file {shapes[0]}, arch {shapes[1]})" if len(shapes) == 2 else ""
            parts.append(f"shape of {source_key(name)}{have}")
    return "; ".join(parts) or first_line(error, 300)


def _check_logits(model: nn.Module, spec: ImportSpec) -> None:
    import torch
    from torch import Tensor

    size = f"{spec.channels}x{spec.image_size}x{spec.image_size}"
    try:
        with torch.no_grad():
            logits = model.eval()(torch.zeros(2, spec.channels, spec.image_size, spec.image_size))
    except Exception as error:  # the network's own forward: any failure is one line
        raise ConfigError(f"arch: {spec.arch} fails on a {size} input: {one_line(error, 200)}") from None
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (2, spec.num_classes):
        shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(
            f"num_classes: arch={spec.arch} maps 2 images of {size} to {shape}, not [2, {spec.num_classes}] "
            "(logits of num_classes classes)"
        )


def score_teacher(
    model: nn.Module, info: TeacherInfo, corpus: Corpus, cache_dir: str | None = None, key: str = "test"
) -> tuple[dict[str, float], int]:
    """Top-1/top-5 (%) of ``model`` on a labelled corpus (as ``test``/``test_top5``) and its size; the
    corpus is read as the teacher sees it (``info``'s size, channels and normaliser). Any problem with the
    corpus is one :class:`ConfigError` line naming ``key``."""
    import torch

    from rayoodkd.engine.evaluation import evaluate

    try:
        images, labels, _ = load_tensors(corpus, info.image_size, info.channels, cache_dir)
    except (FileNotFoundError, ValueError) as error:
        message = first_line(error, 300)
        raise ConfigError(
            f"{key}.{message}" if re.match(r"\w+: ", message) else f"{key}: {message}"
        ) from None
    if int(labels.min()) < 0 or int(labels.max()) >= info.num_classes:
        raise ConfigError(
            f"{key}: labels must lie in 0..{info.num_classes - 1} "
            f"(found {int(labels.min())}..{int(labels.max())})"
        )
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    scores = evaluate(model, (images - mean) / std, labels)
    return {"test": scores["top1"], "test_top5": scores["top5"]}, len(labels)


def import_teacher(
    weights: str | Path, out: str | Path, spec: ImportSpec, cache_dir: str | None = None
) -> TeacherInfo:
    """Wrap a foreign state dict as a rayoodkd teacher; every key must match the architecture, and the
    network must map ``channels``x``image_size``² images to ``num_classes`` logits. With ``spec.test`` the
    teacher is scored on that labelled set and its accuracy recorded."""
    from rayoodkd.models import build_classifier
    from rayoodkd.teacher_io import TeacherInfo, save_teacher

    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
        raise ConfigError(f"mean/std: need {spec.channels} values each (channels={spec.channels})")
    try:
        model = build_classifier(
            spec.arch,
            num_classes=spec.num_classes,
            in_channels=spec.channels,
            image_size=spec.image_size,
            **spec.kwargs,
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(f"arch: {first_line(error, 400)}") from None
    try:
        model.load_state_dict(_foreign_state_dict(Path(weights).expanduser()))
    except RuntimeError as error:
        raise ConfigError(
            f"--weights: the state dict does not fit arch={spec.arch}: {_state_dict_mismatch(error, model)}"
        ) from None
    _check_logits(model, spec)
    info = TeacherInfo(spec.arch, spec.num_classes, spec.channels, spec.image_size, spec.mean, spec.std)
    info.recipe, info.kwargs = {"imported_from": str(weights)}, dict(spec.kwargs)
    if spec.test is not None:
        from rayoodkd.raystart import start_ray_for_reads

        start_ray_for_reads()
        info.accuracy, info.recipe["test_images"] = score_teacher(model, info, spec.test, cache_dir)
        info.recipe["test"] = spec.model_dump(mode="json", include={"test"}, exclude_defaults=True)["test"]
    save_teacher(out, model, info)
    return info


def _import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{prog('teacher')} import",
        description="Wrap a state dict from another project as a rayoodkd teacher checkpoint. "
        "KEY=VALUE keys: " + ", ".join(ImportSpec.model_fields) + ". arch: a registered name, "
        "torchvision:NAME, timm:NAME (pip install timm) or module.path:ClassName (your nn.Module, importable "
        "from the current directory or PYTHONPATH; built with kwargs.*, plus num_classes/in_channels/"
        "image_size where its signature names them). test.source=... test.split=...: score it on a "
        "labelled set (CorpusConfig keys, as the training recipe's test.*, or a list of them: a union). "
        "See docs/teachers.md.",
    )
    parser.add_argument("spec", nargs="*", metavar="KEY=VALUE", help="e.g. arch=resnet18 num_classes=10")
    parser.add_argument("--weights", required=True, help="the foreign .pth/.pt file")
    parser.add_argument("--out", required=True, help="where to write the teacher checkpoint")
    parser.add_argument(
        "--cache-dir", help="corpus cache for test.* (default $RAYOODKD_CACHE or ~/.cache/rayoodkd)"
    )
    args = parser.parse_args(argv)
    from rayoodkd.config import build_section

    spec = build_section(ImportSpec, apply_overrides({}, args.spec), "")
    if spec.test is not None:
        from rayoodkd.preflight import check_corpus

        check_corpus("test", spec.test)  # a path that is not there is one line before Ray starts
    info = import_teacher(args.weights, args.out, spec, args.cache_dir)
    shape = f"{info.num_classes} classes, {info.channels}x{info.image_size}x{info.image_size}"
    scored = ""
    if "test" in info.accuracy:
        scored = (
            f", test top-1 {info.accuracy['test']:.2f}% on {info.recipe['test_images']} images of "
            f"{describe_corpus(spec.test)}"
        )
    print(f"teacher: imported {info.arch} ({shape}{scored}) -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["import"]:
            return _import_main(argv[1:])
        return _train_or_show(argv)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _train_or_show(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("teacher"),
        description="Train a teacher on a labelled set (held-out val/test) and write a self-describing "
        "checkpoint, or --show one; `python -m rayoodkd.teacher import --help` wraps foreign weights. "
        "Overrides are TeacherRecipe keys: " + ", ".join(TeacherRecipe.model_fields),
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. epochs=30")
    parser.add_argument("--out", help="where to write the teacher checkpoint")
    parser.add_argument("--show", metavar="PATH", help="print what a teacher checkpoint holds and exit")
    parser.add_argument("--cache-dir", help="corpus cache (default $RAYOODKD_CACHE or ~/.cache/rayoodkd)")
    args = parser.parse_args(argv)
    if args.show:
        from rayoodkd.teacher_io import read_teacher

        _, info = read_teacher(args.show)
        print(json.dumps(asdict(info), indent=2))
        return 0
    if not args.out:
        raise ConfigError("--out: required (where to write the teacher checkpoint)")
    from rayoodkd.config import build_section
    from rayoodkd.raystart import start_ray_for_reads

    recipe = build_section(TeacherRecipe, apply_overrides({}, args.overrides), "")
    start_ray_for_reads()
    train_teacher(recipe, args.out, args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
