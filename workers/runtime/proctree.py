"""Signal a process tree as the sandbox's /proc shows it: an exec's process (the ``Pid``
Docker reports, in the sandbox daemon's pid namespace, which the worker shares), everything
below it, and every member of the process groups its tree leads, so a daemonized child that
kept its group dies too. Only groups whose leader is in the tree are signalled: never the
group of anything else in the sandbox."""

from __future__ import annotations

import os
import signal


def children(pid: int) -> list[int]:
    """The pid's children, of all its threads (/proc/<pid>/task/*/children)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return found


def process_group(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else None


def tree(root: int) -> set[int]:
    seen = {root}
    todo = [root]
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def visible(pid: int) -> bool:
    return os.path.isdir(f"/proc/{pid}")


def signal_tree(root: int, sig: signal.Signals) -> int:
    """Signal the tree and the groups it leads; returns how many processes were signalled."""
    members = tree(root)
    groups = {g for g in (process_group(p) for p in members) if g is not None and g in members}
    if groups:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in members and process_group(int(entry)) in groups:
                members.add(int(entry))
    sent = 0
    for pid in members:
        try:
            os.kill(pid, sig)
            sent += 1
        except (ProcessLookupError, PermissionError):
            continue
    return sent
