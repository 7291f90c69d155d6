"""A minimal inotify watcher (Linux, ctypes): did any process open or read these files?

The kernel reports ``IN_OPEN`` / ``IN_ACCESS`` on a watched inode for every process,
native code and root included, so a canary file outside a model directory tells us
whether robaudit (or onnx, or onnxruntime) touched it — no strace, no ptrace, no
reliance on atime (which ``relatime``/``noatime`` mounts do not update).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

IN_ACCESS = 0x001
IN_OPEN = 0x020
_EVENT = struct.Struct("iIII")


class Watcher:
    """Watches files for opens and reads; :meth:`touched` drains and names them."""

    def __init__(self) -> None:
        libc_name = ctypes.util.find_library("c")
        if not libc_name or not hasattr(os, "O_NONBLOCK"):
            raise OSError("inotify needs Linux libc")
        self._libc = ctypes.CDLL(libc_name, use_errno=True)
        if not hasattr(self._libc, "inotify_init1"):
            raise OSError("this libc has no inotify")
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._paths: dict[int, Path] = {}

    def watch(self, path: Path) -> None:
        """Report opens and reads of ``path`` (its inode: hard links included)."""
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), IN_OPEN | IN_ACCESS)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch failed for {path}")
        self._paths[wd] = path

    def touched(self) -> set[Path]:
        """The watched files opened or read since the last call."""
        found: set[Path] = set()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & (IN_OPEN | IN_ACCESS) and wd in self._paths:
                    found.add(self._paths[wd])

    def close(self) -> None:
        """Release the inotify descriptor."""
        os.close(self._fd)
