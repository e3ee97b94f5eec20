"""The task-information server's journal: an append-only file of recorded batch ids.

One JSON object per line: a header ``{"task": id, "total": n}`` first, then
``{"batch": b, "worker": w}`` for each recorded batch. Every line is written and fsynced before
the record is acknowledged, so a restarted server knows every batch it ever acknowledged. A
crash can tear the last line; reopening drops a torn tail (it was never acknowledged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from fedenc.elastic.common import ElasticError


class Journal:
    def __init__(self, path: Path, task_id: str, total_batches: int) -> None:
        self.path = path
        self.done: dict[int, str] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        good = 0  # byte length of the intact prefix
        if path.exists():
            data = path.read_bytes()
            header_seen = False
            lines = data.splitlines(keepends=True)
            for number, line in enumerate(lines, 1):
                if not line.endswith(b"\n"):
                    break  # torn tail
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict):
                        raise ValueError("not a JSON object")
                except ValueError as err:
                    if number == len(lines):
                        break  # a torn last line: its batch was never acknowledged
                    # Dropping it would drop every acknowledged batch after it.
                    raise ElasticError(
                        f"journal {path} line {number} is not a journal record ({err}); only a "
                        "torn last line is dropped: mend or delete the journal (deleting it "
                        "restarts the task)"
                    ) from None
                if not header_seen:
                    if entry.get("task") != task_id or entry.get("total") != total_batches:
                        raise ElasticError(
                            f"journal {path} belongs to task {entry.get('task')!r} with "
                            f"{entry.get('total')} batches, not {task_id!r} with {total_batches}"
                        )
                    header_seen = True
                else:
                    batch = entry.get("batch")
                    if not isinstance(batch, int) or not 0 <= batch < total_batches:
                        raise ElasticError(
                            f"journal {path} line {number}: {entry!r} names no batch of "
                            f"0..{total_batches - 1}: mend or delete the journal"
                        )
                    self.done[batch] = str(entry.get("worker", ""))
                good += len(line)
        self.resumed = len(self.done)
        self._file: IO[bytes] = open(path, "r+b" if path.exists() else "w+b")
        self._file.truncate(good)
        self._file.seek(good)
        if good == 0:
            self._append({"task": task_id, "total": total_batches})

    def _append(self, entry: dict[str, object]) -> None:
        self._file.write(json.dumps(entry).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def record(self, batch_id: int, worker_id: str) -> bool:
        """Journal ``batch_id`` as done; False (and nothing written) if it was already."""
        if batch_id in self.done:
            return False
        self._append({"batch": batch_id, "worker": worker_id})
        self.done[batch_id] = worker_id
        return True

    def close(self) -> None:
        self._file.close()
