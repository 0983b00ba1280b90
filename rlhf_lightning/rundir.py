"""One run per directory: a lock file naming its holder.

Two runs writing into one directory destroy each other's logs and mix their checkpoints.
:class:`RunDirLock` creates ``<dir>/.lock`` atomically at start, holding the pid, host,
start time and command of its holder. A second run into the directory fails at once
with a message naming the holder. A lock whose holder died (same host, pid gone) is
stale: it is taken over with a warning. A lock from another host cannot be checked, so
it is an error that says how to clear it.

The pipeline locks its run directory; ``rlhf-lightning fit`` locks the stage's
``trainer.default_root_dir`` (different directories, so a pipeline's stages do not block
it). Only the first process of a run takes the lock (Lightning's DDP children skip it).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirInUseError(RuntimeError):
    """Another live run holds the directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_launcher_child() -> bool:
    """True in the processes Lightning's DDP launcher starts for ranks other than 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0


class RunDirLock:
    """Hold ``<directory>/.lock`` while a run writes into ``directory``.

    Re-entrant within a process (a pipeline stage run in-process may lock a directory its
    caller holds). Released on :meth:`release`, on leaving a ``with`` block, or at exit.
    """

    _held: dict[Path, int] = {}  # resolved lock path -> nesting depth in this process

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._acquired = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written, or garbage: treated as stale below only if unreadable twice

    def _describe(self, holder: dict) -> str:
        started = holder.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
        return (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when} "
            f"(command: {holder.get('command', '?')})"
        )

    def acquire(self) -> RunDirLock:
        key = self.path.resolve()
        if key in self._held:
            self._held[key] += 1
            self._acquired = True
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv)[:500],
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not holder:
                    time.sleep(0.2)  # a holder may be writing it right now
                    holder = self._holder()
                if holder.get("host") == record["host"] and holder.get("pid") == record["pid"]:
                    break  # ours, left by an earlier lock object of this process
                if holder and holder.get("host") != record["host"]:
                    raise RunDirInUseError(
                        f"run directory {self.directory} is locked by {self._describe(holder)}; that host "
                        f"cannot be checked from here. If no run is using the directory, delete {self.path}."
                    ) from None
                if holder and _alive(int(holder.get("pid", -1))):
                    raise RunDirInUseError(
                        f"run directory {self.directory} is in use by {self._describe(holder)}. Wait for that run "
                        "to finish, stop it, or choose another directory (--run_dir / trainer.default_root_dir)."
                    ) from None
                log.warning(
                    "taking over the stale lock of %s: its holder %s is gone",
                    self.directory,
                    self._describe(holder) if holder else "(unreadable lock file)",
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            break
        else:  # pragma: no cover - another process took it over between our two tries
            raise RunDirInUseError(f"run directory {self.directory} was locked by another run while starting")
        self._held[key] = 1
        self._acquired = True
        atexit.register(self.release)
        return self

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        key = self.path.resolve()
        depth = self._held.get(key, 0) - 1
        if depth > 0:
            self._held[key] = depth
            return
        self._held.pop(key, None)
        if self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
