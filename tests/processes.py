"""Processes seen through /proc: the profile service's child processes (a scoring round's, a
rebuild's), and whether one still runs."""

from __future__ import annotations

import os
from pathlib import Path


def state_and_parent(process: Path) -> tuple[str, int]:
    """From /proc/<pid>/stat, after the command in parentheses: the state letter, the parent's pid."""
    state, parent = (process / "stat").read_text().rsplit(")", 1)[1].split()[:2]
    return state, int(parent)


def children(module: str, of: int | None = None) -> list[int]:
    """The children of `of` (this process) running `python -m module`, zombies included (not yet reaped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            _, parent = state_and_parent(entry)
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == (os.getpid() if of is None else of) and module.encode() in command.split(b"\0"):
            found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may not reap it at once)."""
    try:
        return state_and_parent(Path(f"/proc/{pid}"))[0] != "Z"
    except (OSError, IndexError, ValueError):
        return False
