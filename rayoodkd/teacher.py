"""Teachers: train one on a labelled set, write a self-describing checkpoint, load it frozen.

    python -m rayoodkd.teacher --out teacher.pt                      # LeNet-5 on MNIST-5k (the demo recipe)
    python -m rayoodkd.teacher --out t.pt arch=resnet8 epochs=30 train.source=/data/cifar10 ...
    python -m rayoodkd.teacher --show teacher.pt

A teacher checkpoint holds the architecture, class count, input size and channels, the normalisation the
teacher was trained with, its validation and test accuracy, the recipe, and a content hash of its weights;
it is read with ``torch.load(weights_only=True)``. When a run's config gives no ``teacher.checkpoint``, the
recipe is trained once and cached under the cache directory, keyed by the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rayoodkd.augment import augment_batch
from rayoodkd.config import ConfigError, TeacherConfig, TeacherRecipe, apply_overrides
from rayoodkd.data.builtin import cache_root
from rayoodkd.data.config import CorpusConfig
from rayoodkd.engine.checkpoint import state_dict_hash
from rayoodkd.engine.evaluation import evaluate
from rayoodkd.engine.streams import tensor_source
from rayoodkd.models import build_classifier

FORMAT = "rayoodkd.teacher/1"


@dataclass
class TeacherInfo:
    """What a teacher checkpoint says about its network."""

    arch: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    accuracy: dict[str, float] = field(default_factory=dict)
    content_hash: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)


def save_teacher(path: str | Path, model: nn.Module, info: TeacherInfo) -> Path:
    """Write a teacher checkpoint (atomically: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    info.content_hash = state_dict_hash(state_dict)
    payload = {"format": FORMAT, **asdict(info), "mean": list(info.mean), "std": list(info.std)}
    payload["state_dict"] = state_dict
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    return path


def read_teacher(path: str | Path) -> tuple[dict[str, Tensor], TeacherInfo]:
    """The weights and :class:`TeacherInfo` of a checkpoint; the content hash is verified."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher.checkpoint: no such file {str(path)!r}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"teacher.checkpoint {path}: not a rayoodkd teacher (expected format {FORMAT!r})")
    state_dict = payload.pop("state_dict")
    payload.pop("format")
    info = TeacherInfo(**{**payload, "mean": tuple(payload["mean"]), "std": tuple(payload["std"])})
    if state_dict_hash(state_dict) != info.content_hash:
        raise ValueError(
            f"teacher.checkpoint {path}: weights do not match their content hash (corrupt file?)"
        )
    return state_dict, info


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, TeacherInfo]:
    """A frozen teacher in eval mode on ``device``, and what its checkpoint says about it."""
    state_dict, info = read_teacher(path)
    model = build_classifier(
        info.arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size
    )
    model.load_state_dict(state_dict)
    return model.to(device).eval().requires_grad_(False), info


def load_tensors(
    corpus: CorpusConfig, image_size: int, channels: int, cache_dir: str | None = None, seed: int = 0
) -> tuple[Tensor, Tensor, int]:
    """A (small) corpus read through Ray Data into memory: images in [0, 1], labels, corrupt rows skipped."""
    from rayoodkd.data import load_corpus

    dataset = load_corpus(corpus, image_size=image_size, channels=channels, seed=seed, cache_dir=cache_dir)
    images, labels, corrupt = [], [], 0
    for batch in dataset.iter_torch_batches(batch_size=2048):
        keep = ~batch["corrupt"].bool()
        corrupt += int((~keep).sum())
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep].long())
    if not images:
        raise ValueError(f"corpus {corpus.source!r} is empty")
    return torch.cat(images), torch.cat(labels), corrupt


def recipe_key(recipe: TeacherRecipe) -> str:
    """The cache key of a recipe: a hash of every field."""
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_teacher(
    recipe: TeacherRecipe, out: str | Path, cache_dir: str | None = None, log: Any = print
) -> TeacherInfo:
    """Train ``recipe.arch`` on ``recipe.train``; pick the best epoch on ``recipe.val``; score on ``test``.

    SGD (momentum 0.9, Nesterov) with a per-iteration cosine schedule, as MosaicKD's ``train_scratch.py``.
    """
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    size, channels = recipe.image_size, recipe.channels
    train_x, train_y, skipped = load_tensors(recipe.train, size, channels, cache_dir)
    val_x, val_y, _ = load_tensors(recipe.val, size, channels, cache_dir)
    test_x, test_y, _ = load_tensors(recipe.test, size, channels, cache_dir)
    if int(train_y.min()) < 0 or int(train_y.max()) >= recipe.num_classes:
        raise ValueError(f"teacher.recipe.train: labels must lie in 0..{recipe.num_classes - 1}")
    mean = tuple(train_x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    info = TeacherInfo(
        recipe.arch, recipe.num_classes, channels, size, mean, std, recipe=recipe.model_dump(mode="json")
    )

    def normalize(x: Tensor) -> Tensor:
        return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)

    model = build_classifier(
        recipe.arch, num_classes=recipe.num_classes, in_channels=channels, image_size=size
    )
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
            loss = nn.functional.cross_entropy(model(x), batch["label"])
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


def ensure_teacher(teacher: TeacherConfig, cache_dir: str | None = None, log: Any = print) -> Path:
    """The teacher checkpoint a run uses: the configured file, or the recipe's cached result."""
    if teacher.checkpoint:
        path = Path(teacher.checkpoint).expanduser()
        read_teacher(path)
        return path
    path = cache_root(cache_dir) / "teachers" / f"{teacher.recipe.arch}-{recipe_key(teacher.recipe)}.pt"
    if not path.is_file():
        log(f"teacher: no checkpoint given; training the recipe once (cached at {path})")
        train_teacher(teacher.recipe, path, cache_dir, log)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rayoodkd.teacher",
        description="Train a teacher on a labelled set (held-out val/test) and write a self-describing "
        "checkpoint, or --show one. Overrides are TeacherRecipe keys: "
        + ", ".join(TeacherRecipe.model_fields),
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. epochs=30")
    parser.add_argument("--out", help="where to write the teacher checkpoint")
    parser.add_argument("--show", metavar="PATH", help="print what a teacher checkpoint holds and exit")
    parser.add_argument("--cache-dir", help="corpus cache (default $RAYOODKD_CACHE or ~/.cache/rayoodkd)")
    args = parser.parse_args(argv)
    try:
        if args.show:
            _, info = read_teacher(args.show)
            print(json.dumps(asdict(info), indent=2))
            return 0
        if not args.out:
            raise ConfigError("--out: required (where to write the teacher checkpoint)")
        from rayoodkd.config import build_section

        recipe = build_section(TeacherRecipe, apply_overrides({}, args.overrides), "")
        train_teacher(recipe, args.out, args.cache_dir)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
