"""``sere-prep verify OUT``: every shard of ``_info.json`` opens, its samples are complete and the counts match."""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import tarfile
from pathlib import Path

from PIL import Image

from .tarwrite import sample_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def check_shard(path: str, expected: int, decode: bool = False) -> list[str]:
    """Problems found in one shard (empty list if none)."""
    problems, samples, last = [], {}, None
    try:
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                if not ti.isfile():
                    continue
                key, ext = sample_key(ti.name), ti.name.rpartition("/")[2].partition(".")[2]
                if key != last:
                    if key in samples:
                        problems.append(f"{path}: sample '{key}' is split in two places")
                    samples.setdefault(key, {})
                    last = key
                want = (decode and ext in IMAGE_EXTS) or ext == "cls"
                samples[key][ext] = tf.extractfile(ti).read() if want else ti.size
    except (OSError, tarfile.TarError, EOFError) as e:
        return [f"{path}: cannot read the tar ({type(e).__name__}: {e})"]
    for key, s in samples.items():
        img = next((e for e in IMAGE_EXTS if e in s), None)
        if img is None:
            problems.append(f"{path}: sample '{key}' has no image ({sorted(s)})")
        if "cls" not in s:
            problems.append(f"{path}: sample '{key}' has no .cls")
        else:
            try:
                int(s["cls"])
            except ValueError:
                problems.append(f"{path}: sample '{key}' has a non-integer .cls {s['cls']!r}")
        if decode and img is not None:
            try:
                with Image.open(io.BytesIO(s[img])) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001
                problems.append(f"{path}: sample '{key}' does not decode ({type(e).__name__}: {e})")
    if len(samples) != expected:
        problems.append(f"{path}: {len(samples)} samples, _info.json says {expected}")
    return problems


def _check(args):
    return check_shard(*args)


def verify(out: str, split: str | None = None, decode: bool = False, workers: int = 1) -> tuple[dict, list[str]]:
    """(per-split sample counts found, problems) for the shards listed in ``OUT/_info.json``."""
    out_p = Path(out)
    info_p = out_p / "_info.json"
    if not info_p.exists():
        return {}, [f"{info_p} not found (conversion not finished? run `sere-prep merge`)"]
    info = json.loads(info_p.read_text())
    splits = info.get("splits", {})
    if split is not None and split not in splits:
        return {}, [f"split '{split}' not in {info_p} (has {sorted(splits)})"]
    problems, counts = [], {}
    for name, sp in splits.items():
        if split is not None and name != split:
            continue
        files, lengths = sp["filenames"], sp["shard_lengths"]
        if len(files) != len(lengths):
            problems.append(f"{name}: {len(files)} filenames but {len(lengths)} shard_lengths")
            continue
        if sum(lengths) != sp["num_samples"]:
            problems.append(f"{name}: shard_lengths sum to {sum(lengths)}, num_samples is {sp['num_samples']}")
        jobs = []
        for f, n in zip(files, lengths):
            if not (out_p / f).exists():
                problems.append(f"{name}: shard {f} is missing")
            else:
                jobs.append((str(out_p / f), n, decode))
        if workers > 1:
            with mp.get_context("fork").Pool(workers) as pool:
                found = pool.map(_check, jobs)
        else:
            found = [_check(j) for j in jobs]
        for p in found:
            problems.extend(p)
        counts[name] = sum(lengths)
    return counts, problems
