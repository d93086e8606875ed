"""Process-tree helpers for tests that signal or stop the processes of a launch (Linux /proc)."""
from __future__ import annotations

import os
import signal


def _parents() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # exited meanwhile
                pass
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children first found, then theirs)."""
    parents, tree, i = _parents(), [pid], 0
    while i < len(tree):
        tree += [c for c, p in parents.items() if p == tree[i]]
        i += 1
    return tree


def children(pid: int) -> list[int]:
    return [c for c, p in _parents().items() if p == pid]


def env_of(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(x.decode(errors="replace").split("=", 1) for x in items if b"=" in x)


def torchrun_ranks(agent: int) -> dict[int, int]:
    """{global rank: pid} of the workers a torchrun agent started (its children with RANK set)."""
    out = {}
    for c in children(agent):
        r = env_of(c).get("RANK")
        if r is not None:
            out[int(r)] = c
    return out


def signal_all(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (torchrun puts each worker in a session of its own, so a killpg
    of the launch does not reach them)."""
    signal_all(descendants(pid), signal.SIGKILL)
