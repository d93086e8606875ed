"""Batched image decoding on a device (nvJPEG through torchvision) with a per-sample PIL fallback.

``decode_images(encoded, device)`` returns one ``(3, H, W)`` uint8 RGB tensor per input (``None`` where nothing
could decode it). JPEGs that nvJPEG handles (8-bit, 1 or 3 components, baseline / extended / progressive) are
decoded together in one ``torchvision.io.decode_jpeg(list, device=...)`` call; everything else (PNG, CMYK or
12-bit JPEG, ...) and any JPEG the batched call rejects is decoded by PIL on the CPU and moved to the device,
exactly as the CPU loader would (``pixels.decode_rgb``, no EXIF rotation).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sere_scale.data.pixels import decode_rgb

log = logging.getLogger(__name__)
Encoded = bytes | bytearray | memoryview | torch.Tensor | np.ndarray

# Start-of-frame markers: baseline, extended sequential, progressive (Huffman). Lossless (C3) and arithmetic
# coding (C9-CB, CD-CF) go to the fallback.
_DEVICE_SOF = {0xC0, 0xC1, 0xC2}
_ALL_SOF = _DEVICE_SOF | {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass
class JpegInfo:
    sof: int  # start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...)
    precision: int  # bits per sample
    height: int
    width: int
    components: int  # 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK


def jpeg_info(data) -> JpegInfo | None:
    """Parse a JPEG's header up to its start-of-frame segment; ``None`` if ``data`` (bytes or a uint8
    memoryview) is not a JPEG."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _ALL_SOF:
            if i + 10 > n:
                return None
            return JpegInfo(marker, data[i + 4], (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8],
                            data[i + 9])
        if marker == 0xDA or length < 2:  # scan before any frame header: malformed
            return None
        i += 2 + length
    return None


def as_uint8_tensor(x: Encoded) -> torch.Tensor:
    """Encoded bytes as a 1-D uint8 CPU tensor (no copy where possible)."""
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).to("cpu", torch.uint8)
    if isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    return torch.frombuffer(bytearray(x), dtype=torch.uint8) if len(x) else torch.zeros(0, dtype=torch.uint8)


def device_decodable(info: JpegInfo | None) -> bool:
    return info is not None and info.sof in _DEVICE_SOF and info.precision == 8 and info.components in (1, 3) \
        and info.width > 0 and info.height > 0


def pil_decode(t: torch.Tensor) -> torch.Tensor | None:
    """The CPU loader's decode: PIL, convert to RGB; ``None`` if unreadable."""
    try:
        arr = np.asarray(decode_rgb(t.numpy().tobytes()))  # bounded, high bit depths scaled (data/pixels.py)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        log.warning("skipping undecodable image (%d bytes): %s", t.numel(), e)
        return None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _tv_decode(tensors: list, device: torch.device) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg
    if device.type == "cuda":
        # torchvision allocates the outputs from the caller's stream, then nvJPEG writes them from its own stream
        # without waiting for that one (the hardware engine writes as soon as it is called): a block freed while
        # queued kernels still read it could be handed to the decoder and overwritten under them. Drain the
        # caller's stream first (a host wait: a device-side event wait does not hold the hardware engine back;
        # pytorch/vision#9606, meta-pytorch/torchcodec#1634).
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return list(out)


@dataclass
class DecodeStats:
    device: int = 0  # decoded by the batched (nvJPEG on CUDA) call
    fallback: int = 0  # decoded by PIL
    failed: int = 0  # nothing could decode
    retried: int = 0  # JPEGs whose batch call failed and were retried one by one


def decode_images(encoded: Sequence[Encoded], device: str | torch.device = "cpu",
                  stats: DecodeStats | None = None) -> list:
    """Decode a batch; returns a list of ``(3, H, W)`` uint8 tensors on ``device`` or ``None`` (undecodable)."""
    device = torch.device(device)
    stats = stats if stats is not None else DecodeStats()
    tensors = [as_uint8_tensor(e) for e in encoded]
    out: list = [None] * len(tensors)
    jpeg_idx, other_idx = [], []
    for i, t in enumerate(tensors):
        (jpeg_idx if device_decodable(jpeg_info(memoryview(t.numpy()))) else other_idx).append(i)
    if jpeg_idx:
        try:
            dec = _tv_decode([tensors[i] for i in jpeg_idx], device)
            for i, d in zip(jpeg_idx, dec):
                out[i] = d
        except RuntimeError:  # the batched call is all-or-nothing: find the culprits one by one
            for i in jpeg_idx:
                stats.retried += 1
                try:
                    out[i] = _tv_decode([tensors[i]], device)[0]
                except RuntimeError:
                    other_idx.append(i)
        stats.device += sum(out[i] is not None for i in jpeg_idx)
    for i in sorted(other_idx):
        img = pil_decode(tensors[i])
        if img is None:
            stats.failed += 1
        else:
            stats.fallback += 1
            out[i] = img.to(device, non_blocking=device.type == "cuda")
    return out
