"""Reading a W&B offline run's ``.wandb`` file in tests: wandb's record log, a LevelDB-style log (7-byte file
header ``":W&B"``, magic 0xBEE1, version; 32 KiB blocks of chunks with a ``<IHB`` header: CRC-32, length, type
full/first/middle/last) of ``wandb_internal_pb2.Record`` protobufs."""
import json
import struct
import zlib
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    """Every ``Record`` in a ``.wandb`` file, in order (checksums verified)."""
    from wandb.proto import wandb_internal_pb2
    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B record log"
    pos, parts, out = HEADER, [], []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {pos}"
        pos += HEADER + length
        parts.append(chunk)
        if kind in (FULL, LAST):
            out.append(wandb_internal_pb2.Record.FromString(b"".join(parts)))
            parts = []
    return out


def history(path) -> list[dict]:
    """The history rows (``{"_step": n, key: value, ...}``) of a ``.wandb`` file."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            row["_step"] = r.history.step.num if r.history.HasField("step") else row.get("_step")
            rows.append(row)
    return rows


def run_id(path) -> str:
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return r.run.run_id
    raise AssertionError(f"{path}: no run record")
