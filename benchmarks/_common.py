"""Helpers shared by the benchmark scripts: data location, timing, table printing."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def data_dir(arg: str | None) -> Path | None:
    """``--data``, else $FEDENC_DATA, else ../shared/data when it exists."""
    for candidate in (arg, os.environ.get("FEDENC_DATA")):
        if candidate:
            return Path(candidate)
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return default if default.is_dir() else None


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run every variant once per repeat, alternating, so machine noise hits all of them alike.

    The order flips every repeat (A B, B A, A B, ...): with a fixed order, whatever a variant
    inherits from the one before it (cache contents, the allocator's free lists, a drift in
    the machine's speed) biases one side. On the shared 2-core machine a loss change measured
    0.94x the step time twice in a fixed order, and 0.96x and 1.00x with the order flipping."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(timed(variants[name]))
    return out


def train_steps(model: Any, optimizer: Any, examples: Any, index: list[Any], device: Any) -> None:
    """One plain training step per index array, as the trainer's default loop runs them (with a
    :class:`~fedenc.training.table_adam.TableAdam`, the item table's update in the loss's
    backward kernel)."""
    from fedenc.data.batching import build_batch
    from fedenc.training.trainer import training_step

    for idx in index:
        training_step(model, optimizer, build_batch(examples, idx, device))


@contextlib.contextmanager
def native_loss(on: bool) -> Iterator[None]:
    """The training loss's native kernels switched on or off inside the block (the switch is
    read at every loss call), the environment restored after."""
    from fedenc.encoders.layers import native_softmax

    before = os.environ.get(native_softmax.ENV_SWITCH)
    os.environ[native_softmax.ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[native_softmax.ENV_SWITCH]
        else:
            os.environ[native_softmax.ENV_SWITCH] = before


class LossKernelCount:
    """Counts the steps whose loss actually ran in the native kernels, to label the figures by
    what ran (the kernels fall back to PyTorch for unnormalised items, large session norms, a
    failed build...)."""

    def __init__(self) -> None:
        self.native = 0
        self.steps = 0

    @contextlib.contextmanager
    def counting(self, steps: int) -> Iterator[None]:
        from fedenc.encoders.layers import native_softmax

        before = native_softmax.calls
        yield
        self.native += native_softmax.calls - before
        self.steps += steps

    def label(self) -> str:
        from fedenc.encoders.layers import native_softmax

        if self.native == 0:
            why = native_softmax.unavailable_reason()
            return "PyTorch (the native kernels did not run" + (f": {why})" if why else ")")
        return f"native (AVX2/FMA), {self.native} of {self.steps} steps"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"
