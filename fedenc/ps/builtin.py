"""The built-in PS of a trainer (patent US20210357814A1): a compact local table of the rows the
trainer touches, exchanged with the distributed PS every ``exchange_every`` training samples.

* **Resolve.** For each batch the first trainer resolves the keys it touches to local slots
  (row id -> slot), pulling the rows it lacks from the distributed PS in one request.
* **Train.** The second trainer's gradients update only those slots (:mod:`.trainer`).
* **Exchange.** Once ``exchange_every`` samples have been trained (counted in whole batches), the
  built-in PS pushes the accumulated delta ``value - value_at_last_pull`` of every touched row,
  then pulls fresh values of every row it holds (other trainers' changes come in). Between two
  exchanges it sends nothing that changes the distributed PS: pulls of new rows only read.
  ``exchange_every = 0`` exchanges only when :meth:`flush` is called (the end of a round); the
  trainer flushes the last partial window at the end of its work.
* **Capacity.** The local table has ``capacity`` slots; a batch that needs more free slots than
  are left forces an early exchange, after which every slot is freed (counted in
  ``forced_exchanges``). A freed row loses its local optimizer moments.

* **Touch counts.** Each slot counts the training samples whose loss involved its row since the
  last exchange (the trainer passes the batch size with the slots it touched: every sample of a
  batch is scored against every row the batch resolved); each push hands ``(keys, counts)`` to
  the ``on_push`` callbacks. Placement b's children weigh their rows by their data instead
  (:func:`~fedenc.ps.federation.weigh_by_data`), which the dense table's fusion also uses.

``identity = True`` is the layout of the full-softmax path: slot ``k`` holds key ``k`` for the
whole key space (the model's own embedding is the local table) and every row counts as touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedenc.ps.service import DistributedPS


@dataclass
class ExchangeStats:
    exchanges: int = 0
    forced_exchanges: int = 0
    rows_pushed: int = 0
    rows_pulled: int = 0
    samples: int = 0
    history: list[int] = field(default_factory=list)  # samples seen at each exchange

    def to_dict(self) -> dict[str, int]:
        return {
            "exchanges": self.exchanges,
            "forced_exchanges": self.forced_exchanges,
            "rows_pushed": self.rows_pushed,
            "rows_pulled": self.rows_pulled,
            "samples": self.samples,
        }


class BuiltinPS:
    """Local rows ``values`` (slot 0 is padding and never exchanged) backed by ``remote``."""

    def __init__(
        self,
        remote: DistributedPS,
        values: Tensor,
        *,
        exchange_every: int = 0,
        identity: bool = False,
        load: bool = True,
    ) -> None:
        """``load = False`` (identity layout): do not pull the rows now, the owner loads them
        before they are used (placement b reloads the whole table before every round)."""
        if exchange_every < 0:
            raise ValueError(f"exchange_every must be >= 0 samples, got {exchange_every}")
        if values.dim() != 2 or values.shape[1] != remote.width:
            raise ValueError(
                f"local table of shape {list(values.shape)} does not match the distributed "
                f"PS rows ({remote.width} wide)"
            )
        if identity and values.shape[0] != remote.num_keys:
            raise ValueError(
                f"the full-softmax layout needs all {remote.num_keys} rows locally, the local "
                f"table has {values.shape[0]}"
            )
        self.remote = remote
        self.values = values  # the trainer's working rows (a model parameter when identity)
        self.exchange_every = exchange_every
        self.identity = identity
        self.capacity = values.shape[0] - 1
        self.base = torch.zeros_like(values)  # values at the last pull: deltas are against it
        self.key_of_slot = np.full(values.shape[0], -1, dtype=np.int64)
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.touched = torch.zeros(values.shape[0], dtype=torch.bool)
        self.touch_counts = torch.zeros(values.shape[0], dtype=torch.int64)
        self.since_exchange = 0
        self.stats = ExchangeStats()
        #: Called with the freed slots when all slots are freed (the owner resets moments).
        self.on_evict: list[Callable[[Tensor], None]] = []
        #: Called after each push with its keys and their touch counts since the last exchange.
        self.on_push: list[Callable[[np.ndarray, np.ndarray], None]] = []
        if identity:
            self.key_of_slot[1:] = np.arange(1, values.shape[0])
            every = np.arange(1, values.shape[0], dtype=np.int64)
            if load:
                self._load(every, torch.from_numpy(every))
        else:
            self.free = list(range(self.capacity, 0, -1))

    # -- resolve --------------------------------------------------------------------------------

    @property
    def held(self) -> int:
        return self.capacity if self.identity else len(self.slot_of)

    def resolve(self, keys: Tensor) -> Tensor:
        """Local slots of ``keys`` (unique, > 0), pulling the rows not held yet."""
        if self.identity:
            return keys
        wanted = keys.tolist()
        missing = [k for k in wanted if k not in self.slot_of]
        if len(missing) > len(self.free):
            if len(wanted) > self.capacity:
                raise ValueError(
                    f"a batch touches {len(wanted)} rows, the built-in PS holds {self.capacity}: "
                    "raise its capacity or lower the batch size / negatives"
                )
            self.exchange(forced=True, pull=False)  # every held row is dropped next
            self.evict_all()
            missing = wanted
        if missing:
            slots = [self.free.pop() for _ in missing]
            for k, s in zip(missing, slots, strict=True):
                self.slot_of[k] = s
            self._load(np.asarray(missing, dtype=np.int64), torch.as_tensor(slots))
        return torch.as_tensor([self.slot_of[k] for k in wanted], dtype=torch.int64)

    def _load(self, keys: np.ndarray, slots: Tensor) -> None:
        rows = self.remote.pull(keys)
        with torch.no_grad():
            self.values.index_copy_(0, slots, rows)
        self.base.index_copy_(0, slots, rows)
        self.key_of_slot[slots.numpy()] = keys
        self.stats.rows_pulled += keys.size

    def mark_touched(self, slots: Tensor | None = None, samples: int = 0) -> None:
        """Rows whose values the trainer changed (all rows when ``slots`` is None), by the loss
        of ``samples`` training samples."""
        if slots is None:
            self.touched[1:] = True
            self.touch_counts[1:] += samples
        else:
            self.touched[slots] = True
            self.touch_counts[slots] += samples

    # -- exchange -------------------------------------------------------------------------------

    def count(self, samples: int) -> bool:
        """``samples`` more trained; exchanges (and returns True) when the window is full."""
        self.since_exchange += samples
        self.stats.samples += samples
        if self.exchange_every and self.since_exchange >= self.exchange_every:
            self.exchange()
            return True
        return False

    def exchange(self, forced: bool = False, pull: bool = True) -> None:
        """Push the deltas of the touched rows, then pull fresh values of every held row
        (``pull = False``: the held rows are about to be dropped or reloaded, so skip it)."""
        slots, keys, delta = self._changed()
        if slots.numel():
            self.remote.push(keys, delta)
            self.stats.rows_pushed += int(slots.numel())
            counts = self.touch_counts[slots].numpy()
            for callback in self.on_push:
                callback(keys, counts)
        held = torch.from_numpy(np.flatnonzero(self.key_of_slot >= 0))
        if pull and held.numel():
            self._load(self.key_of_slot[held.numpy()], held)
        self.touched.zero_()
        self.touch_counts.zero_()
        self.since_exchange = 0
        self.stats.exchanges += 1
        self.stats.forced_exchanges += int(forced)
        self.stats.history.append(self.stats.samples)

    def _changed(self) -> tuple[Tensor, np.ndarray, Tensor]:
        """The slots of the rows changed here since the last exchange, their keys and deltas."""
        slots = self.touched.nonzero().flatten()
        keys = self.key_of_slot[slots.numpy()]
        with torch.no_grad():
            delta = self.values.index_select(0, slots) - self.base.index_select(0, slots)
        return slots, keys, delta

    def pending(self) -> tuple[np.ndarray, Tensor]:
        """What the next exchange pushes: the keys (sorted) of the rows changed here since the
        last one, and their deltas."""
        _, keys, delta = self._changed()
        order = np.argsort(keys, kind="stable")
        return keys[order], delta[torch.from_numpy(order)]

    def flush(self, pull: bool = True) -> None:
        """Exchange the last partial window (if anything was trained since the last one)."""
        if self.since_exchange or bool(self.touched.any()):
            self.exchange(pull=pull)

    def evict_all(self) -> None:
        """Free every slot (after an exchange: nothing is pending)."""
        if self.identity:
            return
        freed = torch.from_numpy(np.flatnonzero(self.key_of_slot >= 0))
        self.key_of_slot[:] = -1
        self.slot_of.clear()
        self.free = list(range(self.capacity, 0, -1))
        for callback in self.on_evict:
            callback(freed)
