"""Deterministic tar writing: fixed metadata so the same samples always give the same bytes."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path


class ShardTarWriter:
    """Writes ``<key>.<ext>`` members to ``path`` through a temporary name; ``commit()`` renames it into place.

    Nothing appears under ``path`` until the shard is complete (and fsynced), so a killed run leaves at most a
    ``*.tmp-<pid>`` file behind.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.fsync = fsync
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit() / abort()
        self.count, self._size = 0, 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample: a ustar header, the data and zero padding per member (as ``tarfile`` writes)."""
        for ext, data in members.items():
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o444, 0, 0, "", ""
            pad = -len(data) % tarfile.BLOCKSIZE
            chunk = b"".join((ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), data, bytes(pad)))
            self._f.write(chunk)
            self._size += len(chunk)
        self.count += 1

    def commit(self) -> int:
        """Finish the archive, make it durable and move it to its final name; returns its size in bytes."""
        end = self._size + 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros up to a whole record
        self._f.write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def count_tar_samples(path: str | os.PathLike) -> tuple[int, int]:
    """(number of distinct sample keys, number of members) of a tar file, reading headers only."""
    keys, members, last = 0, 0, None
    with tarfile.open(path, "r:") as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            members += 1
            key = sample_key(ti.name)
            if key != last:
                keys, last = keys + 1, key
    return keys, members


def sample_key(name: str) -> str:
    """WebDataset's key: the member path up to the first dot of its base name."""
    d, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{d}/{stem}" if d else stem
