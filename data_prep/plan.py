"""The shard plan: which inputs go to which shard, fixed once per (input listing, seed, shard size).

Written to ``OUT/_plan-<split>.json`` before any shard, so an interrupted or array-parallel conversion always
works from the same assignment. Input ``i`` is the i-th path in sorted order; its sample key is ``%08d % i``.
The assignment is a ``random.Random(seed)`` shuffle of the inputs cut into ``ceil(n / shard_size)`` shards
whose sizes differ by at most one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

PLAN_VERSION = 1


class PlanMismatch(ValueError):
    pass


@dataclass
class Plan:
    split: str
    prefix: str
    seed: int
    shard_size: int
    classes: list[str]
    inputs: list[tuple[str, int]]  # (relative path, label), sorted by path
    shards: list[list[int]]  # input indices per shard, in write order

    @property
    def fingerprint(self) -> dict:
        listing = hashlib.sha256("\n".join(f"{p}\t{c}" for p, c in self.inputs).encode()).hexdigest()
        return {"version": PLAN_VERSION, "split": self.split, "prefix": self.prefix, "seed": self.seed,
                "shard_size": self.shard_size, "num_inputs": len(self.inputs), "num_classes": len(self.classes),
                "listing_sha256": listing}

    def shard_name(self, i: int) -> str:
        return f"{self.prefix}-{self.split}-{i:06d}.tar"

    @property
    def num_shards(self) -> int:
        return len(self.shards)


def make_plan(items: list[tuple[str, str]], classes: list[str], split: str, seed: int, shard_size: int,
              prefix: str = "imagenet") -> Plan:
    if shard_size < 1:
        raise ValueError("--shard-size must be >= 1")
    if "-" in split or "." in split or "/" in split:
        raise ValueError(f"split name '{split}' must not contain '-', '.' or '/'")
    cidx = {w: i for i, w in enumerate(classes)}
    inputs = [(p, cidx[w]) for p, w in items]
    order = list(range(len(inputs)))
    random.Random(seed).shuffle(order)
    n_shards = max(1, math.ceil(len(inputs) / shard_size))
    base, extra = divmod(len(inputs), n_shards)
    shards, at = [], 0
    for s in range(n_shards):
        k = base + (s < extra)
        shards.append(order[at:at + k])
        at += k
    return Plan(split, prefix, seed, shard_size, list(classes), inputs, shards)


def plan_path(out: str | os.PathLike, split: str) -> Path:
    return Path(out) / f"_plan-{split}.json"


def atomic_write_text(path: Path, text: str, fsync: bool = True) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def save_plan(plan: Plan, out: str | os.PathLike) -> None:
    body = {"fingerprint": plan.fingerprint, "classes": plan.classes, "inputs": plan.inputs,
            "shards": plan.shards}
    atomic_write_text(plan_path(out, plan.split), json.dumps(body, separators=(",", ":")))


def load_plan(out: str | os.PathLike, split: str) -> Plan:
    body = json.loads(plan_path(out, split).read_text())
    fp = body["fingerprint"]
    return Plan(fp["split"], fp["prefix"], fp["seed"], fp["shard_size"], body["classes"],
                [tuple(x) for x in body["inputs"]], body["shards"])


def plan_for(out: str | os.PathLike, fresh: Plan) -> Plan:
    """The plan to convert with: the stored one if it matches ``fresh`` (resume), else ``fresh`` (saved)."""
    p = plan_path(out, fresh.split)
    if p.exists():
        old = load_plan(out, fresh.split)
        a, b = old.fingerprint, fresh.fingerprint
        if a != b:
            diff = ", ".join(f"{k}: stored {a[k]!r} vs now {b[k]!r}" for k in a if a[k] != b.get(k))
            raise PlanMismatch(f"{p} was made for a different conversion ({diff}). Convert into a new OUT "
                               f"folder, or delete {p.name} and the {fresh.split} shards to start over.")
        return old
    save_plan(fresh, out)
    return fresh
