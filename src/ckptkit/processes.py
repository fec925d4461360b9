"""Whose a temporary name is: the id and machine of the process that made it, and whether that
process still runs, so that what a killed process left can go at once rather than after a grace
period. Only names made on this machine, in this process-id namespace, can be told."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket


@functools.lru_cache(maxsize=1)
def machine() -> str:
    """A token for this machine and process-id namespace: the ids in names made here are only
    this machine's (a folder shared by nodes, or by containers, holds others'). 64 bits: two
    machines taken for one would delete each other's saves in flight."""
    parts = [socket.gethostname(), *_boot_and_namespace()]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()


@functools.lru_cache(maxsize=1)
def _boot_and_namespace() -> tuple[str, ...]:
    """This boot's id and this process-id namespace's inode, where /proc tells them (Linux)."""
    parts = []
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return tuple(parts)


def alive(pid: int) -> bool:
    """Whether a process of id ``pid`` runs on this machine (another user's counts); True where
    that cannot be asked (Windows, where signal 0 is a Ctrl-C to the process's group)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def writer_mark() -> str:
    """``<pid>.<machine>``: what a temporary name carries of the process making it; ``0.0`` (a
    mark never taken for a process that is gone) where the machine cannot be told apart from
    others of its name (no boot id or process-id namespace to read), or signal 0 does not ask
    whether a process runs (Windows)."""
    if os.name == "nt" or len(_boot_and_namespace()) < 2:
        return "0.0"
    return f"{os.getpid()}.{machine()}"


def writer_gone(mark: str) -> bool:
    """Whether ``mark`` (the end of a name, as ``writer_mark`` made it) names a process of this
    machine that no longer runs. A mark of another machine, of another process-id namespace, or
    of no form known here, could be a process that runs: False."""
    pid, _, where = mark.partition(".")
    if not (pid.isascii() and pid.isdigit()) or writer_mark() == "0.0" or where != machine():
        return False
    return int(pid) != os.getpid() and not alive(int(pid))
