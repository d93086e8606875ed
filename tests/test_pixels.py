"""High-bit-depth images scaled to 8 bits (not clipped) and oversized images kept within the decode bound, in
the loader, the converter and the evaluation readers alike (issue 23, item 6; ``sere_scale/data/pixels.py``).
References: the 16-bit → 8-bit map v·255/65535 (rounded) computed here in float64."""
import io
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from data_prep.imagecheck import prepare_image
from sere_scale.data import pixels
from sere_scale.data.decode import pil_decode
from sere_scale.data.evaldata import decode_rgb as eval_decode
from sere_scale.data.folder import load_rgb

import torch


def _gradient16(h=32, w=64) -> np.ndarray:
    return (np.arange(h * w, dtype=np.float64).reshape(h, w) * (65535.0 / (h * w - 1))).round().astype(np.uint16)


def _png16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # a 16-bit grayscale PNG
    return buf.getvalue()


def _ref8(arr16: np.ndarray) -> np.ndarray:
    return np.rint(arr16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def test_a_16bit_png_is_scaled_not_clipped_by_every_reader(tmp_path):
    arr = _gradient16()
    data = _png16(arr)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode in ("I;16", "I")  # what PIL makes of it: convert("RGB") alone would clip
        assert np.asarray(im.convert("RGB")).mean() > 240  # the bug: nearly all white
    f = tmp_path / "deep.png"
    f.write_bytes(data)
    want = _ref8(arr)
    outs = {"loader (folder)": np.asarray(load_rgb(str(f))),
            "loader (device path, CPU decode)": pil_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            .permute(1, 2, 0).numpy(),
            "evaluation reader": np.asarray(eval_decode(data))}
    for name, got in outs.items():
        assert got.shape == (*arr.shape, 3), name
        for c in range(3):
            assert np.array_equal(got[..., c], want), name
    # the converter re-encodes it as an 8-bit grayscale JPEG (quality 95) of the same values
    prep = prepare_image(data)
    assert not prep.error and prep.reencoded == "PNG I;16"
    with Image.open(io.BytesIO(prep.data)) as im:
        assert im.mode == "L"
        assert np.abs(np.asarray(im).astype(int) - want.astype(int)).max() <= 4


def test_other_high_bit_modes():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))  # "F" in [0, 1]
    assert f.mode == "F" and np.asarray(pixels.to_8bit(f)).tolist() == [[0, 128, 255]]
    i = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))  # "I" holding 8-bit values: kept
    assert i.mode == "I" and np.asarray(pixels.to_8bit(i)).tolist() == [[0, 100, 255]]
    i16 = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))  # "I" holding 16-bit values
    assert np.asarray(pixels.to_8bit(i16)).tolist() == [[0, 1, 255]]
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert pixels.to_8bit(rgb) is rgb  # 8-bit modes untouched


def test_an_oversized_image_is_refused_or_reduced_with_the_file_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(pixels, "MAX_PIXELS", 100 * 100)
    png, jpg = tmp_path / "huge.png", tmp_path / "huge.jpg"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(png)
    Image.new("RGB", (300, 200), (10, 20, 30)).save(jpg, quality=95)
    with caplog.at_level(logging.WARNING, logger="sere_scale"):
        assert load_rgb(str(png)) is None  # refused: counted as a corrupt image by the loader
    assert any(str(png) in r.getMessage() and "exceed the decode bound" in r.getMessage() for r in caplog.records)
    im = load_rgb(str(jpg))  # a JPEG decodes reduced (DCT scaling): 1/2 here fits, 150 x 100 > bound: 1/4
    assert im.size[0] * im.size[1] <= 100 * 100 and im.size == (75, 50)
    with pytest.raises(pixels.ImageTooLarge, match="an image of"):
        eval_decode(png.read_bytes())
    assert "exceed the decode bound" in prepare_image(png.read_bytes()).error


def test_a_decompression_bomb_sized_png_is_refused_without_decoding(tmp_path, caplog):
    """The reproduction's size: a 144-megapixel PNG (12000 x 12000), refused from its header; PIL's anonymous
    DecompressionBombWarning is not raised."""
    f = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(f)  # 1 bit per pixel: 18 MB in memory, a small file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING, logger="sere_scale"):
            assert load_rgb(str(f)) is None
        with pytest.raises(pixels.ImageTooLarge, match="144,000,000 pixels"):
            pixels.open_image(str(f))
    assert any("bomb.png" in r.getMessage() for r in caplog.records)
