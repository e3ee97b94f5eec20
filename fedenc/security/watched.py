"""A file whose parsed content is reloaded when it changes on disk, so that a running master picks
up a new revocation list or allowlist without a restart."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from fedenc.security.errors import SecurityError

log = logging.getLogger(__name__)

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """``load(path)`` once now (errors propagate), then again whenever the file's modification
    time or size changes. A reload that fails keeps the last good content and logs the error:
    files are replaced atomically, so a failure means a bad edit, and keeping what was loaded
    never forgets a revocation."""

    def __init__(self, path: Path, load: Callable[[Path], T]) -> None:
        self.path = Path(path)
        self._load = load
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._value = load(self.path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def get(self) -> T:
        stamp = self._stat()
        with self._lock:
            if stamp != self._stamp:
                try:
                    value = self._load(self.path)
                except SecurityError as err:
                    log.error("keeping the previous %s: reload failed: %s", self.path, err)
                else:
                    self._value = value
                    log.info("reloaded %s", self.path)
                self._stamp = stamp
            return self._value
