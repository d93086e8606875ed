"""Batched decode with per-image PIL fallback: routing by header, equality with PIL, failures counted."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sere_scale.data.decode import DecodeStats, as_uint8_tensor, decode_images, jpeg_info


def enc(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    arr = np.repeat(np.repeat(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), 5, 0), 5, 1)  # 30×40 blocks
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def files(image):
    base = enc(image, "JPEG", quality=95)
    sos = base.find(b"\xff\xda")
    return {
        "baseline": base,
        "progressive": enc(image, "JPEG", quality=95, progressive=True),
        "grey": enc(image.convert("L"), "JPEG", quality=95),
        "cmyk": enc(image.convert("CMYK"), "JPEG", quality=95),
        "png": enc(image, "PNG"),
        "palette_png": enc(image.convert("P"), "PNG"),
        "garbage": b"not an image" * 20,
        "empty": b"",
        "truncated": base[: sos + 40],
    }


def pil_rgb(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def test_jpeg_header(files):
    info = {k: jpeg_info(v) for k, v in files.items()}
    assert (info["baseline"].sof, info["baseline"].width, info["baseline"].height) == (0xC0, 40, 30)
    assert info["progressive"].sof == 0xC2 and info["grey"].components == 1 and info["cmyk"].components == 4
    assert info["png"] is None and info["garbage"] is None and info["empty"] is None
    assert jpeg_info(memoryview(as_uint8_tensor(files["baseline"]).numpy())) == info["baseline"]


def test_routing_results_and_counts(files):
    names = list(files)
    st = DecodeStats()
    # all input kinds the loader may produce: bytes, numpy, tensors
    inputs = [files[n] if i % 3 == 0 else np.frombuffer(files[n], np.uint8) if i % 3 == 1
              else as_uint8_tensor(files[n]) for i, n in enumerate(names)]
    out = dict(zip(names, decode_images(inputs, "cpu", st)))
    for n in ("garbage", "empty", "truncated"):
        assert out[n] is None
    assert (st.device, st.fallback, st.failed) == (3, 3, 3)  # JPEG 8-bit 1/3 components | CMYK + PNGs | bad
    assert st.retried == 4  # the batched call failed on the truncated file: every JPEG retried alone
    for n in ("baseline", "progressive", "grey", "cmyk", "png", "palette_png"):
        got, ref = out[n], pil_rgb(files[n])
        assert got.dtype == torch.uint8 and got.shape == (3, 30, 40), n
        # libjpeg-turbo (torchvision) and PIL's libjpeg may round the IDCT/colour conversion differently
        assert (got.float() - ref.float()).abs().mean() < 1.0, n
    assert torch.equal(out["png"], pil_rgb(files["png"]))  # the fallback is the CPU loader's decode
    assert torch.equal(out["grey"][0], out["grey"][2])


def test_good_batch_is_one_call(files, monkeypatch):
    import sere_scale.data.decode as D
    calls = []
    orig = D._tv_decode
    monkeypatch.setattr(D, "_tv_decode", lambda t, d: calls.append(len(t)) or orig(t, d))
    st = DecodeStats()
    out = decode_images([files["baseline"], files["png"], files["progressive"], files["grey"]], "cpu", st)
    assert calls == [3] and st.retried == 0 and all(o is not None for o in out)
