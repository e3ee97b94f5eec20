"""The master's ServerApp (Flower Message API): reads the run config and runs one job.

Transport-free: it talks to the children through the ``Grid`` it is given, so it runs unchanged on
fedenc's in-process runtime, its gRPC runtime and Flower's engines. The protocol itself is
:func:`fedenc.federation.master.run_master`. With ``out-dir`` in the run config it writes the
encoder checkpoint, ``results.json``, ``rounds.csv`` and a plot there; the result (JSON) and the
target's tensors are also left in ``context.state`` for the host.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedenc.federation.master import MasterConfig, round_listener, run_master
from fedenc.federation.records import params_to_record
from fedenc.federation.report import write_outputs
from fedenc.federation.runconfig import get_str

RESULT_KEY = "fedenc.result"
TARGET_KEY = "fedenc.target"

log = logging.getLogger(__name__)
app = ServerApp()


@contextmanager
def _show_progress() -> Iterator[None]:
    """Under Flower's own runtimes nothing would show fedenc's info lines (who confirmed, each
    round's metrics): Python's last-resort handler prints warnings only. Send them to stderr,
    which ``flwr run --stream`` and ``flwr log`` relay, unless the host set up logging; for this
    run only, so that a program that runs jobs through the Python API keeps its logging as it
    set it up afterwards."""
    if logging.getLogger().handlers or round_listener.get() is not None:
        yield  # the host set up logging, or shows the rounds itself
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    changed = []
    for name in ("fedenc", "nodes"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            changed.append((logger, logger.level, logger.propagate))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in changed:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


@app.main()
def main(grid: Grid, context: Context) -> None:
    with _show_progress():
        _main(grid, context)


def _main(grid: Grid, context: Context) -> None:
    config = MasterConfig.from_run_config(context.run_config)
    result = run_master(grid, config)
    summary = result.to_dict()
    context.state[RESULT_KEY] = ConfigRecord({"json": json.dumps(summary)})
    context.state[TARGET_KEY] = params_to_record(result.target)
    out_dir = get_str(context.run_config, "out-dir", "")
    if out_dir:
        write_outputs(summary, Path(out_dir), {"run_config": dict(context.run_config)})
    elif round_listener.get() is None:  # Flower's runtimes drop context.state with the run
        log.warning(
            "no out-dir in the run config: the encoder of job %s is written nowhere (set "
            'out-dir = "/absolute/path" to keep it, on the machine that runs this ServerApp)',
            result.job_id,
        )
    log.info("job %s done: %s", result.job_id, result.stop_reason)
