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


def test_cuda_decode_waits_for_the_callers_stream(files, monkeypatch):
    """On CUDA the caller's stream is drained before nvJPEG runs (it may otherwise write into blocks that queued
    kernels still read); checked on CPU with stand-ins for the stream and the decoder."""
    import torchvision.io

    events = []

    class Stream:
        def synchronize(self):
            events.append("sync")

    def fake_decode(tensors, mode, device):
        events.append(("decode", len(tensors), torch.device(device).type))
        return [pil_rgb(t.numpy().tobytes()) for t in tensors]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode)
    out = decode_images([files["baseline"], files["grey"]], "cuda")
    assert events == ["sync", ("decode", 2, "cuda")] and all(o is not None for o in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_cuda_routing_and_results(files):
    """The batched nvJPEG call (baseline, progressive and grey JPEGs together) and the PIL fallback on CUDA."""
    names = list(files)
    st = DecodeStats()
    out = dict(zip(names, decode_images([files[n] for n in names], "cuda", st)))
    assert out["garbage"] is None and out["empty"] is None
    assert st.fallback == 3 and st.device >= 3 and st.device + st.fallback + st.failed == len(names)
    assert st.failed in (2, 3)  # nvJPEG may decode what the truncated file holds (PIL rejects it)
    for n in ("baseline", "progressive", "grey", "cmyk", "png", "palette_png"):
        got, ref = out[n], pil_rgb(files[n])
        assert got.is_cuda and got.dtype == torch.uint8 and got.shape == (3, 30, 40), n
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a few levels at most
        assert (got.cpu().float() - ref.float()).abs().mean() < 3.0, n
    assert torch.equal(out["png"].cpu(), pil_rgb(files["png"]))
    assert torch.equal(out["grey"][0], out["grey"][2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_cuda_decode_does_not_write_into_memory_in_use():
    """Free tensors while reductions over them are still queued behind a long kernel, then decode: the decoded
    images may reuse their blocks, and must not change what the queued reductions read (pytorch/vision#9606)."""
    rng = np.random.default_rng(0)
    jpeg = enc(Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)), "JPEG", quality=90)
    n_bytes = 3 * 128 * 128  # the decoded image's size: same allocator pool and block size as the freed tensors
    bad = 0
    for it in range(30):
        held = [torch.full((n_bytes,), k % 251, dtype=torch.uint8, device="cuda") for k in range(8)]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # ~10 ms of queued device work ahead of the reductions
        sums = [t.sum(dtype=torch.int64) for t in held]
        del held  # freed on the stream that still has the reductions queued
        decode_images([jpeg] * 8, "cuda")
        torch.cuda.synchronize()
        bad += sum(int(s) != (k % 251) * n_bytes for k, s in enumerate(sums))
    assert bad == 0
