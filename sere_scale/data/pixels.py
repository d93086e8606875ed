"""Opening images safely and bringing them to 8 bits, one definition for the training loader (folders and
shards, CPU and device decode), the evaluation readers and the shard converter (``data_prep``). PIL and numpy
only (no torch).

* **High bit depth.** PIL opens 16-bit grayscale (PNG, TIFF) as ``I;16*`` or ``I`` and float TIFFs as ``F``;
  ``convert("RGB")`` on those *clips* every value above 255 (a 16-bit image turns nearly all white).
  ``to_8bit`` scales instead: ``I;16*`` by 255/65535; ``I`` by 255/65535 when its values lie in [0, 65535]
  (16-bit data; values in [0, 255] are kept), else by its own range; ``F`` from [0, 1] when its values lie
  there, else from its own range. 16-bit RGB PNGs already arrive as 8-bit ``RGB`` (PIL keeps the high bytes).
* **Memory bound.** An image of more than ``MAX_PIXELS`` pixels (64 Mpx: 192 MiB as 8-bit RGB) is never
  decoded at full size: a JPEG is decoded reduced by its DCT scaling (``draft``: 1/2, 1/4 or 1/8) to at most
  ``MAX_PIXELS``; any other format is refused with :class:`ImageTooLarge` naming the file (the loader counts it
  as a corrupt image). PIL's own decompression-bomb warning is replaced by this check; its error (above twice
  PIL's limit) becomes :class:`ImageTooLarge` too.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 1 << 26  # 67,108,864 pixels (e.g. 8192 x 8192): at most 192 MiB per decoded 8-bit RGB image
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageTooLarge(ValueError):
    """An image over ``MAX_PIXELS`` that cannot be decoded reduced; the message names the file."""


def open_image(src, name: str = "") -> Image.Image:
    """``Image.open`` of a path, bytes or file object, not yet decoded, whose full decode fits ``MAX_PIXELS``
    (a larger JPEG is set to decode reduced, another format raises :class:`ImageTooLarge`). ``name``: the file
    (or shard member) for messages."""
    if name:
        label = name
    elif isinstance(src, (bytes, bytearray)):
        label = f"an image of {len(src)} bytes"
    else:
        label = str(src) if isinstance(src, (str, os.PathLike)) else "an image"
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with the file named
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"{label}: {e}; refused (sere_scale.data.pixels.MAX_PIXELS = {MAX_PIXELS})") \
                from None
    try:
        bound(im, label)
    except ImageTooLarge:
        im.close()
        raise
    return im


def bound(im: Image.Image, name: str = "an image") -> Image.Image:
    """Keep the decode of an opened (not yet loaded) image within ``MAX_PIXELS`` (see the module docstring)."""
    w, h = im.size
    if w * h <= MAX_PIXELS:
        return im
    if im.format == "JPEG":
        k = 2
        while k < 8 and (w // k) * (h // k) > MAX_PIXELS:
            k *= 2
        if (w // k) * (h // k) <= MAX_PIXELS:
            im.draft(im.mode, (max(1, w // k), max(1, h // k)))
            return im
    raise ImageTooLarge(f"{name}: {w} x {h} = {w * h:,} pixels exceed the decode bound of {MAX_PIXELS:,} "
                        f"(sere_scale.data.pixels.MAX_PIXELS); refused")


def to_8bit(im: Image.Image) -> Image.Image:
    """``im`` with a high-bit-depth mode (``HIGH_BIT_MODES``) scaled to 8-bit ``L``; other modes unchanged."""
    if im.mode not in HIGH_BIT_MODES:
        return im
    a = np.asarray(im)
    if a.dtype.kind != "f" and im.mode.startswith("I;16"):
        scaled = a.astype(np.float64) * (255.0 / 65535.0)
    else:
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if im.mode == "F" and lo >= 0 and hi <= 1:
            scaled = a * 255.0
        elif im.mode == "I" and lo >= 0 and hi <= 255:
            scaled = a
        elif im.mode == "I" and lo >= 0 and hi <= 65535:
            scaled = a * (255.0 / 65535.0)
        else:  # its own range
            scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as a new 8-bit RGB image: high bit depths scaled (``to_8bit``), then ``convert("RGB")``."""
    return to_8bit(im).convert("RGB")


def decode_rgb(src, name: str = "") -> Image.Image:
    """Open (bounded), decode and convert to 8-bit RGB; raises on unreadable data."""
    with open_image(src, name) as im:
        im.load()
        return to_rgb(im)
