"""Decide how an input image goes into a shard: original JPEG bytes (checked) or a re-encoded JPEG.

Baseline (SOF0) 8-bit JPEGs with 1 (grayscale) or 3 (YCbCr/RGB) components keep their bytes. Everything
else that decodes (PNG, CMYK or progressive JPEG, WebP, ...) is decoded in full and re-encoded as a baseline
JPEG (quality 95, 4:4:4; "L" stays grayscale, everything else becomes "RGB", alpha dropped as ``convert("RGB")``
does; 16-bit and float images are scaled to 8 bits first, not clipped, by ``sere_scale.data.pixels.to_8bit``, the
loader's own helper). An image over ``sere_scale.data.pixels.MAX_PIXELS`` is checked at a reduced JPEG scale or
refused (never decoded in full). Anything that fails is reported with a reason, never raised.

Checks for kept JPEGs (``check=``):

* ``"scan"`` (default): PIL parses the headers; the header tables are exercised by decoding the first 4 KiB of
  scan data (at 1/8 scale, followed by a synthetic EOI); the entropy-coded data is walked to the EOI marker,
  accepting only stuffed bytes (FF00), restart markers and the segments allowed between scans. This rejects
  everything a full decode rejects (truncation, broken headers or tables, illegal markers; see
  tests/test_data_prep.py for the fuzz comparison) and a few more files a full decode would turn into
  garbage. Like a full decode it cannot see flipped bits inside the entropy data (libjpeg only warns).
* ``"draft"``: a decode at 1/8 scale (all entropy data is decoded, the IDCT is reduced).
* ``"full"``: a full decode.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from sere_scale.data.pixels import open_image, to_8bit

CHECKS = ("scan", "draft", "full")
REENCODE_QUALITY = 95
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_BETWEEN_SCANS = {0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xFE} | set(range(0xE0, 0xF0))  # DHT DAC SOS DQT DRI COM APPn
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass
class Prepared:
    """The bytes to store (``None`` when the input is rejected) and what was done."""
    data: bytes | None
    width: int = 0
    height: int = 0
    reencoded: str = ""  # why the input was re-encoded ("" when the original bytes are kept)
    error: str = ""  # why the input was rejected


class JpegStructureError(ValueError):
    pass


def jpeg_headers(b: bytes) -> tuple[tuple[int, int, int] | None, int]:
    """Walk the markers before the first scan: ((sof_marker, precision, n_components) or None, scan start)."""
    if b[:2] != b"\xff\xd8":
        raise JpegStructureError("no JPEG start-of-image marker")
    i, n, sof = 2, len(b), None
    while True:
        if i + 4 > n:
            raise JpegStructureError("file ends inside the JPEG headers")
        if b[i] != 0xFF:
            raise JpegStructureError(f"bad JPEG marker at byte {i}")
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
            continue
        if m == 0xD9:
            raise JpegStructureError("end-of-image marker before any scan")
        seg = (b[i + 2] << 8) | b[i + 3]
        if seg < 2 or i + 2 + seg > n:
            raise JpegStructureError(f"bad JPEG segment length at byte {i}")
        if m in _SOF:
            if seg < 8:
                raise JpegStructureError("short frame header")
            sof = (m, b[i + 4], b[i + 9])
        if m == 0xDA:
            return sof, i + 2 + seg
        i += 2 + seg


_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker, not a stuffed byte, restart or fill byte


def walk_scans(b: bytes, start: int) -> int:
    """Walk entropy-coded data from ``start`` to the EOI marker; return its offset or raise."""
    search, i, n = _MARKER.search, start, len(b)
    while True:
        m = search(b, i)
        if m is None:
            raise JpegStructureError("truncated JPEG: no end-of-image marker after the scan data")
        j = m.start()
        c = b[j + 1]
        if c == 0xD9:
            return j
        elif c in _BETWEEN_SCANS:  # tables / next scan header: skip the segment
            if j + 4 > n:
                raise JpegStructureError("truncated JPEG inside a segment between scans")
            seg = (b[j + 2] << 8) | b[j + 3]
            if seg < 2 or j + 2 + seg > n:
                raise JpegStructureError(f"bad segment length at byte {j}")
            i = j + 2 + seg
        else:
            raise JpegStructureError(f"illegal marker FF{c:02X} in JPEG scan data at byte {j}")


def _decode_prefix(b: bytes, scan_start: int, nbytes: int = 4096) -> None:
    pre = b[: scan_start + nbytes]
    if pre.endswith(b"\xff"):
        pre = pre[:-1]
    with Image.open(io.BytesIO(pre + b"\xff\xd9")) as im:
        im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()


def _check_jpeg(b: bytes, im: Image.Image, scan_start: int, check: str) -> None:
    if check == "scan":
        walk_scans(b, scan_start)
        _decode_prefix(b, scan_start)
    elif check == "draft":
        im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()
    elif check == "full":
        im.load()
    else:
        raise ValueError(f"unknown check '{check}' (choose from {', '.join(CHECKS)})")


def _reencode(im: Image.Image) -> bytes:
    im.load()
    mode = "L" if im.mode in _GRAY_MODES else "RGB"
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    out = to_8bit(im).convert(mode)  # 16-bit / float images scaled to 8 bits, as the loader does (not clipped)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=REENCODE_QUALITY, subsampling=0)  # 4:4:4: no chroma loss
    return buf.getvalue()


def prepare_image(data: bytes, check: str = "scan") -> Prepared:
    """Check ``data`` and return what to store; never raises for bad input."""
    if not data:
        return Prepared(None, error="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette images with transparency: handled in _reencode
            with open_image(data) as im:  # over sere_scale.data.pixels.MAX_PIXELS: reduced (JPEG) or refused
                w, h = im.size
                if im.format == "JPEG":
                    sof, scan_start = jpeg_headers(data)
                    baseline = sof is not None and sof[0] == 0xC0 and sof[1] == 8 and sof[2] in (1, 3)
                    if baseline and im.mode in ("L", "RGB"):
                        _check_jpeg(data, im, scan_start, check)
                        return Prepared(data, w, h)
                    why = ("progressive JPEG" if sof and sof[0] == 0xC2 else f"{im.mode} JPEG" if im.mode not in
                           ("L", "RGB") else "non-baseline JPEG")
                else:
                    why = f"{im.format or 'unknown'} {im.mode}"
                out = _reencode(im)
                return Prepared(out, w, h, reencoded=why)
    except Exception as e:  # noqa: BLE001 - any failure of a third-party decoder means "corrupt input"
        return Prepared(None, error=f"{type(e).__name__}: {e}")
