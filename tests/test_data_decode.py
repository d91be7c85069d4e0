"""decode_batch: pure numpy/Pillow, no Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rayoodkd.data import decode_batch


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _batch(*items: object, labels: list | None = None) -> dict[str, np.ndarray]:
    images = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        images[i] = item
    batch = {"image": images}
    if labels is not None:
        batch["label"] = np.asarray(labels)
    return batch


def test_valid_png_decodes_exactly_with_label() -> None:
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    out = decode_batch(_batch(_encode(Image.fromarray(pixels)), labels=[7]), image_size=4, channels=1)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(out["image"][0, 0], pixels)
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [7]
    assert out["corrupt"].dtype == bool and out["corrupt"].tolist() == [False]


def test_resize_squashes_instead_of_cropping() -> None:
    pixels = np.zeros((10, 40), dtype=np.uint8)
    pixels[:, :10] = 255  # only the left quarter is white: a centre crop would be all black
    out = decode_batch(_batch(_encode(Image.fromarray(pixels))), image_size=10, channels=1)["image"][0, 0]
    assert out.shape == (10, 10)
    assert out[:, :2].min() > 0.9 * 255 and out[:, 4:].max() < 0.05 * 255


def test_corrupt_inputs_are_flagged_not_raised() -> None:
    good = _encode(Image.fromarray(np.full((6, 6), 200, np.uint8)))
    truncated = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    truncated = truncated[: len(truncated) // 2]
    garbage = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    out = decode_batch(_batch(good, truncated, garbage, b"", None, labels=[1, 2, 3, 4, 5]), 6, 1)
    assert out["corrupt"].tolist() == [False, True, True, True, True]
    assert out["label"].tolist() == [1, 2, 3, 4, 5]
    assert np.all(out["image"][1:] == 0)
    assert np.all(out["image"][0] == 200)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        # palette image: index 1 -> red, with index 0 transparent (composited onto black)
        ("P", 0.299),
        ("RGBA", 0.0),  # fully transparent white -> black
        ("LA", 0.5),  # half-transparent white -> mid gray
        ("CMYK", 1.0),  # no ink -> white
        ("I;16", 1.0),  # 65535 -> full scale, not clipped garbage
        ("1", 1.0),
    ],
)
def test_odd_modes_are_converted(make: str, expected: float) -> None:
    size = (8, 8)
    if make == "P":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.info["transparency"] = 0
        data = _encode(img)
    elif make == "RGBA":
        data = _encode(Image.new("RGBA", size, (255, 255, 255, 0)))
    elif make == "LA":
        data = _encode(Image.new("LA", size, (255, 128)))
    elif make == "CMYK":
        data = _encode(Image.new("CMYK", size, (0, 0, 0, 0)), "TIFF")
    elif make == "I;16":
        data = _encode(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)))
        assert Image.open(io.BytesIO(data)).mode.startswith("I")
    else:
        data = _encode(Image.new("1", size, 1))
    out = decode_batch(_batch(data), image_size=4, channels=1)
    assert not out["corrupt"][0]
    np.testing.assert_allclose(out["image"][0, 0] / 255, expected, atol=0.01)
    rgb = decode_batch(_batch(data), image_size=4, channels=3)
    assert rgb["image"].shape == (1, 3, 4, 4) and not rgb["corrupt"][0]


def test_gray_to_rgb_and_rgb_to_gray() -> None:
    gray = _encode(Image.fromarray(np.full((5, 5), 100, np.uint8)))
    out = decode_batch(_batch(gray), image_size=5, channels=3)["image"][0]
    assert out.shape == (3, 5, 5)
    assert np.all(out == 100)
    red = _encode(Image.new("RGB", (5, 5), (255, 0, 0)))
    out = decode_batch(_batch(red), image_size=5, channels=3)["image"][0]
    assert out[:, 2, 2].tolist() == [255, 0, 0]
    luma = decode_batch(_batch(red), image_size=5, channels=1)["image"][0, 0, 2, 2]
    assert int(luma) == pytest.approx(76, abs=1)  # ITU-R 601: 0.299 * 255


def test_large_jpeg_uses_reduced_decoding_and_keeps_content() -> None:
    rng = np.random.default_rng(0)
    pixels = np.zeros((512, 384, 3), np.uint8)
    pixels[:256] = (240, 240, 240)
    pixels += rng.integers(0, 10, pixels.shape, dtype=np.uint8)
    data = _encode(Image.fromarray(pixels), "JPEG", quality=90)
    out = decode_batch(_batch(data), image_size=16, channels=1)["image"][0, 0]
    assert out[:7].mean() > 0.9 * 255 and out[9:].mean() < 0.1 * 255


def test_raw_pixel_arrays_and_missing_labels() -> None:
    gray = np.stack([np.full((6, 6), v, np.uint8) for v in (0, 51, 255)])
    out = decode_batch({"image": gray}, image_size=3, channels=1)
    assert out["image"][:, 0, 0, 0].tolist() == [0, 51, 255]
    assert out["label"].tolist() == [-1, -1, -1] and not out["corrupt"].any()
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 1] = 255
    out = decode_batch({"image": rgb, "label": np.array([3, 4])}, image_size=4, channels=3)
    assert np.all(out["image"][:, 1] == 255) and np.all(out["image"][:, [0, 2]] == 0)
    bad = _batch(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8), labels=[None, 2])
    out = decode_batch(bad, image_size=4, channels=1)
    assert out["corrupt"].tolist() == [True, False] and out["label"].tolist() == [-1, 2]
    float_labels = {"image": np.zeros((2, 4, 4), np.uint8), "label": np.array([2.0, np.nan])}
    assert decode_batch(float_labels, image_size=4, channels=1)["label"].tolist() == [2, -1]


def test_empty_batch_and_bad_channels() -> None:
    out = decode_batch({"image": np.empty(0, dtype=object)}, image_size=5, channels=3)
    assert out["image"].shape == (0, 3, 5, 5) and out["label"].shape == (0,) and out["corrupt"].shape == (0,)
    with pytest.raises(ValueError, match="channels"):
        decode_batch({"image": np.empty(0, dtype=object)}, image_size=5, channels=2)


def test_workers_turn_decoded_pixels_into_the_floats_decoding_used_to_make() -> None:
    import torch

    from rayoodkd.augment import unit_images

    pixels = np.arange(256, dtype=np.uint8)
    before = pixels.astype(np.float32) * np.float32(1.0 / 255.0)  # what decode_batch returned before
    after = unit_images(torch.from_numpy(pixels))
    assert after.dtype == torch.float32 and np.array_equal(after.numpy(), before)
    floats = torch.rand(3, dtype=torch.float64)
    assert unit_images(floats).dtype == torch.float32 and torch.equal(unit_images(floats), floats.float())
