"""The master's side of ``fedenc.v1.Control``: a job queue run on the connected children, served
on the same gRPC server (port, TLS) as ``fedenc.v1.Federation``.

* **Jobs.** :meth:`ControlService.submit` checks a spec (:mod:`fedenc.control.spec`) and queues
  it. One worker thread runs the queue in order, one job at a time, each as an ordinary run of
  ``nodes/master.py``'s ServerApp through :func:`~fedenc.runtime.grpc.master.run_server_app`
  (so the Flower task identity, the run announcement to the children and the grid's cleanup are
  the runtime's own). Each job writes its outputs, encoder checkpoint included, to
  ``<out_root>/<job id>/``.
* **Rounds.** ``run_master`` reports each round through the ``round_listener`` ContextVar; the
  service keeps the reports (WatchJob replays them) and wakes the watchers.
* **Cancel.** A cancelled job stops after its current round: the round listener raises
  :class:`JobCancelled`, which unwinds ``run_master``; a cancelled job is never resumed
  (``resumable`` is False), so the children get the end-of-job message and drop its state.
* **Restarts.** Every job has a ``job.json`` from the moment it is queued. A master that stops
  (a signal) interrupts its running job after the current round instead of cancelling it, and
  leaves the queue as it is; the children keep the job's state. The next master on the same
  ``out_root`` queues those jobs again, first the one that was running, which resumes from its
  checkpoint after its last completed round (its run id too, so children that kept their state
  go on bit for bit) or starts again without one. A master killed outright does the same from
  the records it left, and counts the job's ``crashes`` (its record still says it runs): past
  ``max_crashes`` the job is failed instead, so that a job that takes its master down (memory,
  a native crash) does not do so again after every restart.
  Before the first round (waiting for children, confirmations) the job's grid raises it at the
  next ``get_node_ids``, so the job does not wait out its timeout.
* **Children.** The :class:`~fedenc.runtime.grpc.master.FederationServer` tells the service who
  joins and leaves; the job's grid (:class:`_ControlGrid`) tells it who was queried, who
  confirmed or declined, and which replies are still owed (in round).
* **Download.** From the job's saved checkpoint, not from memory: what a client downloads is the
  master's saved encoder bit for bit, and a finished job costs no memory.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, NoReturn

import grpc
from flwr.app import Message
from flwr.serverapp import ServerApp

from fedenc import atomic
from fedenc.control.spec import (
    JobSpecError,
    RunConfig,
    check_job,
    dict_to_struct,
    encoder_view,
    matches,
    round_report,
    spec_to_run_config,
    struct_to_dict,
)
from fedenc.encoders.base import EncoderConfig
from fedenc.encoders.registry import UnknownEncoderError, encoder_class
from fedenc.federation import records
from fedenc.federation.master import MasterConfig, RoundResult, resumable, round_listener
from fedenc.proto.fedenc.v1 import control_pb2 as cpb
from fedenc.proto.fedenc.v1 import control_pb2_grpc as cgrpc
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.protocol.chunking import DEFAULT_MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, stream_tensors
from fedenc.protocol.peer_text import clip
from fedenc.runtime.grpc.connection import ChildConnection
from fedenc.runtime.grpc.master import FederationServer, GrpcGrid, run_server_app
from fedenc.runtime.grpc.transport import Identify, Refused
from fedenc.training.checkpoint import META_FILE, STATE_FILE

log = logging.getLogger(__name__)

TERMINAL = frozenset({cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED})
#: Certificate names that may submit, cancel and list by default (`fedenc certs issue operator`).
DEFAULT_OPERATORS: Final = ("operator",)
#: An ended job's record in its output folder (what a restarted master lists again).
JOB_FILE: Final = "job.json"
LOCK_FILE: Final = ".master.lock"
#: Long streams (WatchJob, DownloadEncoder) one non-operator caller may hold at once.
MAX_CHILD_STREAMS: Final = 2
#: How often a long stream checks its caller's certificate again (revocation).
RECHECK_S: Final = 30.0
#: WatchJob and DownloadEncoder streams open at once: each holds a server thread while it lasts.
MAX_WATCHERS = 8
#: Job ids a NOT_FOUND names (the most recent ones).
_KNOWN_IDS_SHOWN = 5
_ROUND_MESSAGES = frozenset({"train", "evaluate"})


#: Characters of a status message (gRPC allows 16 KiB of metadata in all).
STATUS_TEXT_LIMIT: Final = 2000

#: Characters of a job's ``requester`` (a name, kept and listed with the job).
MAX_REQUESTER: Final = 256

#: Seconds a round may still run after a cancel before the wait for its replies is cut.
CANCEL_GRACE_S: Final = 10.0

#: Times a job's master may die while running it before the next master fails the job.
DEFAULT_MAX_CRASHES: Final = 2


class NotAllowed(Exception):
    """A request this caller may not make (the RPC answers PERMISSION_DENIED)."""


class JobCancelled(Exception):
    """Raised inside a running job to stop it (CancelJob, or the master stopping)."""


class ServiceStopped(RuntimeError):
    """The master is shutting down and takes no more jobs."""


def _ms(t: float) -> int:
    return int(t * 1000) if t else 0


def _wall(monotonic_time: float) -> float:
    """A ``time.monotonic()`` instant as Unix time."""
    return time.time() - (time.monotonic() - monotonic_time)


def _restored_job(folder: Path, max_crashes: int) -> tuple[JobRecord, bool]:
    """A :class:`JobRecord` from a job's ``job.json``: an ended job as it ended (with
    ``results.json``: its rounds, and the tensors its encoder shares), an unfinished one queued
    again (:func:`_requeue`); and whether it differs from the record (a record to write again).

    A record that still says RUNNING was left by a master that died (one stopped by a signal
    records the job it interrupted as QUEUED): one more crash, and past ``max_crashes`` the
    job is failed."""
    from google.protobuf import json_format

    # Fields a later version adds are skipped, not a reason to drop the job.
    proto = json_format.Parse(
        (folder / JOB_FILE).read_text(), cpb.Job(), ignore_unknown_fields=True
    )
    if proto.job_id != folder.name:  # a copied or edited record: it would shadow another job
        raise ValueError(f"job_id {proto.job_id!r} is not its folder's name")
    run_config = struct_to_dict(proto.effective_config)
    job = JobRecord(
        job_id=proto.job_id,
        spec=proto.spec,
        requester=proto.requester,
        run_config=run_config,
        config=MasterConfig.from_run_config(run_config),
        created=proto.created_unix_ms / 1000,
        cancel_requested=proto.cancel_requested,
        started=proto.started_unix_ms / 1000,
        crashes=proto.crashes,
    )
    if proto.state not in TERMINAL:
        died = proto.state == cpb.JOB_STATE_RUNNING
        job.crashes += died
        if died and job.crashes > max_crashes and not job.cancel_requested:
            _requeue(job, folder, running=True)  # its rounds, from its checkpoint, for the record
            job.state = cpb.JOB_STATE_FAILED
            job.error = (
                f"its master died {job.crashes} times while running it (killed or crashed); "
                f"not taken up again past --max-crashes {max_crashes}. Submit it again, or "
                "restart the master with a higher --max-crashes"
            )
            job.finished = time.time()
            return job, True
        # Interrupted (a signal) or died: it ran, and goes first again.
        _requeue(job, folder, running=died or proto.started_unix_ms > 0)
        return job, job.done or died
    results_path = folder / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    encoder = folder / "encoder"
    job.state = proto.state
    job.rounds = [
        round_report(proto.job_id, RoundResult.from_dict(r)) for r in results.get("rounds", [])
    ]
    job.finished = proto.finished_unix_ms / 1000
    job.stop_reason = proto.stop_reason
    job.error = proto.error
    job.final_metrics = dict(proto.final_metrics)
    job.checkpoint = encoder if proto.encoder_available and encoder.is_dir() else None
    job.target_names = list(results.get("shared_parameters", []))
    return job, False


class OutRootInUse(ValueError):
    """Another master serves this ``out_root``."""


def _claim(out_root: Path) -> IO[str] | None:
    """An exclusive lock on ``out_root/.master.lock``, held while this master serves: two
    masters on one folder would both run its unfinished jobs. None where there is no
    ``fcntl`` (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        return None
    out_root.mkdir(parents=True, exist_ok=True)
    handle = (out_root / LOCK_FILE).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OutRootInUse(
            f"another master serves {out_root} (it holds {out_root / LOCK_FILE}): stop it "
            "first, or give this one another --out"
        ) from None
    return handle


def _requeue(job: JobRecord, folder: Path, running: bool) -> None:
    """A job that was queued or running when the earlier master stopped, queued again: from its
    checkpoint (``resume``, its run id and rounds) when it completed a round, else afresh."""
    from fedenc.federation.checkpoint import MasterStateError, read_master_state, state_path

    if job.cancel_requested:  # a user's cancel the earlier master did not see through
        job.state = cpb.JOB_STATE_CANCELLED
        job.error = "cancelled (the master stopped before the job ended)"
        job.finished = time.time()
        return
    job.interrupted = running
    # Where the folder is now (an --out moved, or given relative from another directory).
    job.run_config["out-dir"] = str(folder)
    job.run_config.pop("state-dir", None)
    job.run_config["resume"] = False
    state_dir = folder / "state"
    if state_path(state_dir).is_file():
        try:
            saved = read_master_state(state_dir)
        except MasterStateError as err:  # listed, with why: the operator decides
            job.state = cpb.JOB_STATE_FAILED
            job.error = f"cannot resume after the master's restart: {err}"
            job.finished = time.time()
            return
        job.run_config["resume"] = True
        job.run_id = saved.run_id
        job.earlier_rounds = list(saved.rounds)
        job.rounds = [round_report(job.job_id, RoundResult.from_dict(r)) for r in saved.rounds]


def _check_requester(requester: str) -> None:
    """:class:`JobSpecError` for a requester too long to keep with a job (it is listed to every
    client)."""
    if len(requester) > MAX_REQUESTER:
        raise JobSpecError(
            f"requester is {len(requester):,} characters long; at most {MAX_REQUESTER}"
        )


def _iso(unix: float) -> str:
    """A Unix time as ISO 8601 UTC ("" for 0: not yet)."""
    if not unix:
        return ""
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


def _state_name(state: int) -> str:
    return cpb.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


@dataclass(eq=False)
class JobRecord:
    """A job as the service keeps it (guarded by the service's lock)."""

    job_id: str
    spec: cpb.JobSpec
    requester: str
    run_config: RunConfig
    config: MasterConfig
    created: float = field(default_factory=time.time)
    state: int = cpb.JOB_STATE_QUEUED
    rounds: list[cpb.RoundReport] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    stop_reason: str = ""
    error: str = ""
    cancel_requested: bool = False
    cancel_reason: str = ""
    final_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    target_names: list[str] = field(default_factory=list)
    interrupted: bool = False  # stopped by the master's shutdown: the next master resumes it
    run_id: int | None = None  # a resumed job's (the children key their state by it)
    earlier_rounds: list[dict[str, Any]] = field(default_factory=list)  # ... its checkpoint's
    crashes: int = 0  # masters that died while running it (see the module's docstring)

    @property
    def encoder_type(self) -> str:
        return self.config.encoder

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


@dataclass(eq=False)
class _Child:
    name: str
    node_id: int
    peer: str
    agent: str
    connected_at: float
    conn: ChildConnection | None
    left_reason: str = ""
    last_seen: float = 0.0  # Unix time, kept when the child leaves


class _ControlGrid(GrpcGrid):
    """The job's grid: the runtime's :class:`GrpcGrid`, plus what ListChildren and CancelJob
    need (who was queried, who confirmed, which replies are owed; cancel before round 1)."""

    def __init__(
        self,
        server: FederationServer,
        run_id: int,
        run_config: Mapping[str, Any],
        *,
        service: ControlService,
        job: JobRecord,
    ) -> None:
        self._service = service
        self._job = job
        self._cancel_raised = False
        self._cancel_seen: float | None = None  # when a wait first saw the cancel request
        self._training = False  # round 1 was sent: from then on the round listener cancels
        super().__init__(server, run_id, run_config)

    @property
    def training(self) -> bool:
        """Whether round 1's train messages went out (the job is past its waits)."""
        return self._training

    def get_node_ids(self) -> list[int]:
        # run_master asks for the nodes while it waits for children and before each query: the
        # place to stop a job cancelled before its first round (later, the round listener does).
        if self._job.cancel_requested and not self._training and not self._cancel_raised:
            self._cancel_raised = True  # once: the job's end-of-job message still needs nodes
            raise JobCancelled("cancelled before its first round")
        return super().get_node_ids()

    def _stop_check(self) -> Callable[[], None]:
        """A cancel ends the job's waits for replies: at once while it waits for its children's
        confirmations, and after :data:`CANCEL_GRACE_S` in a round (whose end is where a cancel
        normally takes effect; a silent child with no round timeout would otherwise keep the
        job, and the queue behind it, forever)."""

        def stop() -> None:
            if not self._job.cancel_requested:
                return
            if self._cancel_seen is None:
                self._cancel_seen = time.monotonic()
            if not self._training:
                raise JobCancelled("cancelled while it waited for its children's confirmations")
            if time.monotonic() - self._cancel_seen >= CANCEL_GRACE_S:
                raise JobCancelled(
                    f"cancelled during a round whose replies were still missing after "
                    f"{CANCEL_GRACE_S:g} s"
                )

        return stop

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        batch = list(messages)
        if any(m.metadata.message_type == "train" for m in batch):
            self._training = True
        queried = [m.metadata.dst_node_id for m in batch if m.metadata.message_type == "query"]
        if queried:
            self._service._note_queried(queried)
        for m in batch:  # the master refused a confirmation: the child is not in the job
            if m.metadata.message_type == records.NOTICE_ACTION:
                config: Mapping[str, Any] = m.content.config_records.get(records.CONFIG_KEY) or {}
                if config.get(records.DROP):
                    reason = str(config.get(records.REASON, "refused by the master"))
                    self._service._note_refused(m.metadata.dst_node_id, reason)
        return super().push_messages(batch)

    def deliver(self, reply: Message, message_id: str) -> None:
        with self._lock:
            entry = self._pending.get(message_id)
        if entry is not None and entry[1].metadata.message_type == "query":
            self._service._note_answer(entry[0], reply)
        super().deliver(reply, message_id)

    def owed(self) -> set[int]:
        """Nodes whose train or evaluate reply the job still awaits."""
        with self._lock:
            return {
                nid
                for nid, message in self._pending.values()
                if message.metadata.message_type in _ROUND_MESSAGES
            }


class ControlService(cgrpc.ControlServicer):
    """``fedenc.v1.Control`` on a :class:`FederationServer`: call :meth:`attach` before the
    server starts, :meth:`stop` before it stops."""

    def __init__(
        self,
        server: FederationServer,
        defaults: Mapping[str, Any],
        out_root: Path,
        *,
        server_app: ServerApp | None = None,
        operators: Iterable[str] = DEFAULT_OPERATORS,
        max_crashes: int = DEFAULT_MAX_CRASHES,
    ) -> None:
        if max_crashes < 0:
            raise ValueError(f"max_crashes must be >= 0, got {max_crashes}")
        if server_app is None:
            from nodes.master import app as master_app

            server_app = master_app
        self._server = server
        self._server_app = server_app
        # Certificate names that may run the federation (with mutual TLS; plaintext identifies
        # nobody): any other certificate of the CA, a child's, may only ask for encoders.
        self.operators = frozenset(operators)
        self._defaults: RunConfig = {
            k: v for k, v in defaults.items() if k not in ("job-id", "out-dir")
        }
        self.out_root = Path(out_root)
        self.max_crashes = max_crashes
        self._cond = threading.Condition()
        self._jobs: dict[str, JobRecord] = {}
        self._queue: deque[JobRecord] = deque()
        self._current: JobRecord | None = None
        self._grid: _ControlGrid | None = None
        # node id -> (ChildState, decline reason) in the running job
        self._participation: dict[int, tuple[int, str]] = {}
        self._children: dict[str, _Child] = {}
        self._watchers = 0
        self._streams_of: dict[str, int] = {}  # long streams open per non-operator caller
        self._stopping = False
        self._records_closed = False
        self._claim = _claim(self.out_root)
        self._restore_jobs()
        self._worker = threading.Thread(target=self._work, name="fedenc-control-jobs", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------

    def attach(self) -> ControlService:
        """Adds the service to the server (before ``server.start()``) and starts the job worker."""
        cgrpc.add_ControlServicer_to_server(self, self._server.grpc_server)
        _enable_reflection(self._server.grpc_server)
        self._server.observer = self
        # An operator's certificate is for the Control API: it cannot also join as a child.
        self._server.reserved_names = self.operators
        self._worker.start()
        return self

    def stop(
        self, reason: str = "the master shuts down", timeout: float = 30.0, keep: bool = False
    ) -> bool:
        """No more jobs here. ``keep``: the running job is interrupted after its round and the
        queue kept, for the next master on the same ``out_root`` (their ``job.json`` say so);
        else both are cancelled. Returns whether a job was interrupted with a checkpoint to
        resume from (its children should wait: close their streams with RESTART)."""
        with self._cond:
            self._stopping = True
            while self._queue and not keep:
                self._end(self._queue.popleft(), cpb.JOB_STATE_CANCELLED, error=reason)
            current = self._current
            if current is not None and not current.cancel_requested:
                current.cancel_requested = True
                current.cancel_reason = reason
                current.interrupted = keep
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)
        if self._worker.is_alive() and keep:
            with self._cond:
                # Its round outlasted the wait: recorded as interrupted (QUEUED) now, or the
                # next master would take this stop for a crash. It resumes from its checkpoint.
                if current is not None and current.interrupted and not current.done:
                    self._record_interrupted(current)
                self._records_closed = True  # what the worker does from here is not recorded
        if self._claim is not None:  # the next master on out_root may start now
            self._claim.close()
            self._claim = None
        if current is None or not current.interrupted:
            return False
        from fedenc.federation.checkpoint import state_path

        return state_path(self.out_root / current.job_id / "state").is_file()

    # -- jobs (Python API; the RPCs below wrap it) -----------------------------------------------

    def submit(self, spec: cpb.JobSpec, requester: str = "") -> JobRecord:
        """Checks ``spec`` and queues it; :class:`JobSpecError` says what is wrong."""
        _check_requester(requester)
        run_config = spec_to_run_config(spec, self._defaults)
        encoder = str(run_config.get("encoder", "srgnn"))
        job_id = f"{encoder}-{uuid.uuid4().hex[:12]}"
        run_config["job-id"] = job_id
        run_config["out-dir"] = str(self.out_root / job_id)
        config = check_job(run_config)
        job = JobRecord(job_id, spec, requester, run_config, config)
        with self._cond:
            if self._stopping:
                raise ServiceStopped("the master is shutting down and takes no more jobs")
            self._jobs[job_id] = job
            self._queue.append(job)
            self._save_job(job)  # a restart queues it again
            self._cond.notify_all()
        log.info(
            "job %s queued (%s, %d rounds%s)",
            job_id,
            encoder,
            config.rounds,
            f", for {requester}" if requester else "",
        )
        return job

    def request_encoder(
        self, request: fpb.EncoderRequest, requester: str | None = None, choose: bool = True
    ) -> tuple[JobRecord, bool]:
        """Claim 2: the job whose encoder answers ``request``, and whether it was started now
        (for ``requester``, default the request's own). Without ``choose`` (a child's request)
        a new job runs with the master's settings only: :class:`NotAllowed` when the request
        would start one with its own encoder config, training or round budget."""
        if not request.encoder_type:
            raise JobSpecError("encoder_type is required")
        try:
            encoder_class(request.encoder_type)
        except UnknownEncoderError as err:
            raise JobSpecError(str(err)) from None
        wanted = struct_to_dict(request.config)
        with self._cond:
            candidates = [
                j
                for j in reversed(self._jobs.values())
                if j.encoder_type == request.encoder_type
                and matches(encoder_view(j.config), wanted)
            ]
            for states in (
                {cpb.JOB_STATE_SUCCEEDED},
                {cpb.JOB_STATE_RUNNING, cpb.JOB_STATE_QUEUED},
            ):
                for job in candidates:
                    # a running job being cancelled will not produce the encoder
                    if job.state in states and not (job.cancel_requested and not job.done):
                        return job, False
        if not choose and (wanted or request.HasField("training") or request.round_budget):
            raise NotAllowed(
                "no job has such an encoder, and only operators start jobs with their own encoder "
                "config, training or round budget: ask with the encoder type alone"
            )
        spec = cpb.JobSpec(encoder_type=request.encoder_type, training=request.training)
        if request.HasField("config"):
            spec.encoder_config.CopyFrom(request.config)
        if request.round_budget:
            spec.rounds = request.round_budget
        who = request.requester if requester is None else requester
        return self.submit(spec, who), True

    def job(self, job_id: str) -> JobRecord | None:
        with self._cond:
            return self._jobs.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Blocks until the job has ended (or ``timeout``); for hosts and tests."""
        with self._cond:
            job = self._jobs[job_id]
            self._cond.wait_for(lambda: job.done, timeout)
            return job

    def cancel(self, job_id: str, reason: str = "", by: str = "") -> JobRecord | None:
        """Cancel a job (``by``: who asked, for the log and the job's error)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return job
            job.cancel_requested = True
            job.interrupted = False  # a user's cancel wins over a shutdown's interruption
            job.cancel_reason = (
                f"by {by}: {reason}" if by and reason else (f"by {by}" if by else reason)
            )
            if job.state == cpb.JOB_STATE_QUEUED and job in self._queue:
                self._queue.remove(job)
                self._end(job, cpb.JOB_STATE_CANCELLED, error=self._cancel_text(job))
            else:  # recorded: a master killed before the job ends must not resume it
                self._save_job(job)
            self._cond.notify_all()
        log.info(
            "job %s: cancel requested%s",
            job_id,
            f" ({job.cancel_reason})" if job.cancel_reason else "",
        )
        return job

    # -- the worker -------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._stopping)
                if self._stopping:
                    return
                job = self._queue.popleft()
                job.state = cpb.JOB_STATE_RUNNING
                job.started = time.time()
                job.interrupted = False  # (a resumed job's: set again only by a shutdown)
                self._current = job
                self._participation = {}
                self._save_job(job)  # a restart resumes it
                self._cond.notify_all()
            log.info("job %s started", job.job_id)
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._current = None
                    self._grid = None
                    self._participation = {}
                    self._cond.notify_all()

    def _run(self, job: JobRecord) -> None:
        from fedenc.federation.master import NotEnoughChildrenError, round_line
        from nodes.master import RESULT_KEY

        # The rounds, for the outputs of a job that fails (a resumed one's from its checkpoint).
        done: list[dict[str, Any]] = list(job.earlier_rounds)

        def on_round(result: RoundResult) -> None:
            # The service shows the rounds to its watchers, so the master logs none: log here.
            log.info("job %s: %s", job.job_id, round_line(result))
            done.append(result.to_dict())
            with self._cond:
                job.rounds.append(round_report(job.job_id, result))
                cancel = job.cancel_requested and not result.stop_reason
                interrupted = job.interrupted
                self._cond.notify_all()
            if cancel:
                # Interrupted by the shutdown, the job will be resumed: the children keep it.
                resumable.set(interrupted)
                raise JobCancelled(f"cancelled after round {result.round}")

        def make_grid(server: FederationServer, run_id: int, config: Mapping[str, Any]) -> GrpcGrid:
            grid = _ControlGrid(server, run_id, config, service=self, job=job)
            with self._cond:
                self._grid = grid
            return grid

        token = round_listener.set(on_round)
        no_resume = resumable.set(False)
        try:
            run = run_server_app(
                self._server_app,
                self._server,
                job.run_config,
                grid_class=make_grid,
                run_id=job.run_id,
            )
        except JobCancelled:
            with self._cond:
                error = self._cancel_text(job)
                interrupted = job.interrupted
            if interrupted:  # queued again: the next master on out_root resumes it
                with self._cond:
                    why, resumes = job.cancel_reason, job.interrupted
                    self._record_interrupted(job)
                log.info(
                    "job %s interrupted after round %d (%s): the next master on %s %s it",
                    job.job_id, len(job.rounds), why, self.out_root,
                    "resumes" if resumes else "cancels (a user's cancel came in meanwhile)",
                )  # fmt: skip
                return
            self._stop_unfinished(job, cpb.JOB_STATE_CANCELLED, error, done)
            return
        except (NotEnoughChildrenError, ValueError, FileNotFoundError) as err:
            log.warning("job %s failed: %s", job.job_id, err)
            self._stop_unfinished(job, cpb.JOB_STATE_FAILED, str(err), done)
            return
        except Exception as err:  # a job's bug must not take the master down
            log.exception("job %s crashed", job.job_id)
            self._stop_unfinished(job, cpb.JOB_STATE_FAILED, f"{type(err).__name__}: {err}", done)
            return
        finally:
            resumable.reset(no_resume)
            round_listener.reset(token)
        summary: dict[str, Any] = json.loads(str(run.server_context.state[RESULT_KEY]["json"]))
        with self._cond:
            job.stop_reason = str(summary.get("stop_reason", ""))
            job.final_metrics = {k: float(v) for k, v in summary.get("final_metrics", {}).items()}
            job.target_names = list(summary.get("shared_parameters", []))
            checkpoint = summary.get("checkpoint")
            job.checkpoint = Path(checkpoint) if checkpoint else None
            self._end(job, cpb.JOB_STATE_SUCCEEDED)

    def _stop_unfinished(
        self, job: JobRecord, state: int, error: str, rounds: list[dict[str, Any]]
    ) -> None:
        """End a job that failed or was cancelled, after writing its ``results.json`` and
        ``rounds.csv`` (the rounds it did, who asked for it, why it ended: they lived in memory
        only); written first, so that a watcher that sees the end finds them."""
        from fedenc.federation.report import write_results, write_rounds_csv

        out = self.out_root / job.job_id
        with self._cond:
            record = {
                "job_id": job.job_id,
                "encoder": job.encoder_type,
                "state": _state_name(state),
                "error": error,
                "requester": job.requester,
                "created": _iso(job.created),
                "started": _iso(job.started),
                "finished": _iso(time.time()),
                "rounds": rounds,
                "effective_config": dict(job.run_config),
            }
        try:
            if not self._records_closed:  # (a worker outliving stop(): the files are not its)
                write_results(record, out)
                write_rounds_csv(rounds, out)
        except OSError as err:  # the job's record in memory stays; only the files are lost
            log.warning("job %s: cannot write its outputs to %s: %s", job.job_id, out, err)
        with self._cond:
            self._end(job, state, error=error)

    def _record_interrupted(self, job: JobRecord) -> None:
        """Under the lock: a job the master's stop interrupted, recorded QUEUED for the next
        master (RUNNING would say the master died: a crash counted). The stop's cancel is no
        user's, which would have cleared ``interrupted``: then the record keeps it."""
        job.state = cpb.JOB_STATE_QUEUED
        if job.interrupted:
            job.cancel_requested = False
            job.cancel_reason = ""
        self._save_job(job)

    def _end(self, job: JobRecord, state: int, error: str = "") -> None:
        """Under the lock."""
        job.state = state
        job.error = error
        job.finished = time.time()
        self._cond.notify_all()
        log.info("job %s %s%s", job.job_id, _state_name(state), f": {error}" if error else "")
        self._save_job(job)

    def _save_job(self, job: JobRecord) -> None:
        """Under the lock: the job's record in ``<out>/<job id>/job.json``, which a master
        restarted on the same ``--out`` lists again (an ended job, whose encoder it serves) or
        queues again (a queued or running one)."""
        from google.protobuf import json_format

        if self._records_closed:  # a worker outliving stop(): the next master owns the records
            return
        path = self.out_root / job.job_id / JOB_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json_format.MessageToJson(self._job_proto(job), preserving_proto_field_name=True)
            atomic.write_text(path, text + "\n")
        except OSError as err:  # the record in memory stands; only a restart forgets the job
            log.warning("job %s: cannot write %s: %s", job.job_id, path, err)

    def _restore_jobs(self) -> None:
        """The jobs of an earlier master on the same ``out_root`` (their ``job.json``): ended
        ones are listed, unfinished ones queued again (a running one first, resumed from its
        checkpoint when it has one)."""
        if not self.out_root.is_dir():
            return
        restored: list[JobRecord] = []
        changed: set[str] = set()  # ended or counted on restore: their records written again
        for folder in sorted(p for p in self.out_root.iterdir() if p.is_dir()):
            if not (folder / JOB_FILE).is_file():
                if (folder / "state" / "master.pt").is_file():
                    log.warning(
                        "job %s was running when the earlier master stopped: not restored (its "
                        "checkpoint is in %s; submit the job again)",
                        folder.name,
                        folder / "state",
                    )
                continue
            try:
                job, ended_here = _restored_job(folder, self.max_crashes)
            except Exception as err:  # a damaged record must not keep the master from starting
                log.warning("%s: not restored (%s)", folder / JOB_FILE, err)
                continue
            restored.append(job)
            if ended_here:
                changed.add(job.job_id)
        for job in sorted(restored, key=lambda j: j.created):
            self._jobs[job.job_id] = job
            if job.job_id in changed:
                self._save_job(job)  # ended here (a cancel, a damaged checkpoint), or a crash
        unfinished = [j for j in restored if j.state == cpb.JOB_STATE_QUEUED]
        for job in sorted(unfinished, key=lambda j: (not j.interrupted, j.created)):
            self._queue.append(job)
            died = job.job_id in changed  # its record said RUNNING: a crash counted
            how = (
                "its master died while running it"
                if died
                else (
                    f"it was {'running' if job.interrupted else 'queued'} when the earlier master "
                    "stopped"
                )
            )
            if died:
                how += f" ({job.crashes} of at most {self.max_crashes} crashes)"
            if job.run_config.get("resume"):
                log.info("job %s: %s; it resumes after round %d", job.job_id, how,
                         len(job.rounds))  # fmt: skip
            else:
                log.info("job %s: %s; queued again", job.job_id, how)
        if restored:
            log.info("%d earlier job(s) restored from %s", len(restored), self.out_root)

    @staticmethod
    def _cancel_text(job: JobRecord) -> str:
        where = f"after round {len(job.rounds)}" if job.rounds else "before its first round"
        if job.state == cpb.JOB_STATE_QUEUED:
            where = "before it started"
        return f"cancelled {where}" + (f" ({job.cancel_reason})" if job.cancel_reason else "")

    # -- children ----------------------------------------------------------------------------------

    def child_joined(self, conn: ChildConnection, hello: spb.Hello) -> None:
        with self._cond:
            self._children[hello.name] = _Child(
                hello.name, conn.node_id, conn.peer, hello.agent, time.time(), conn
            )

    def child_left(self, conn: ChildConnection, reason: str) -> None:
        with self._cond:
            entry = self._children.get(conn.name)
            if entry is not None and entry.conn is conn:
                entry.conn = None
                entry.left_reason = clip(reason)
                entry.last_seen = _wall(conn.last_seen)

    def _note_queried(self, nodes: list[int]) -> None:
        with self._cond:
            for nid in nodes:
                self._participation[nid] = (cpb.CHILD_STATE_QUERIED, "")

    def _note_refused(self, node_id: int, reason: str) -> None:
        with self._cond:
            self._participation[node_id] = (cpb.CHILD_STATE_DECLINED, clip(reason))

    def _note_answer(self, node_id: int, reply: Message) -> None:
        if reply.has_error():
            answer = (cpb.CHILD_STATE_DECLINED, f"error reply: {reply.error.reason}")
        else:
            try:
                confirmation, _ = records.read_confirmation(reply.content)
            except ValueError as err:
                answer = (cpb.CHILD_STATE_DECLINED, f"bad confirmation: {err}")
            else:
                if confirmation.accepted:
                    answer = (cpb.CHILD_STATE_CONFIRMED, "")
                else:
                    answer = (cpb.CHILD_STATE_DECLINED, confirmation.decline_reason or "declined")
        with self._cond:
            self._participation[node_id] = answer

    def children(self) -> list[cpb.ChildInfo]:
        with self._cond:
            entries = list(self._children.values())
            grid, job = self._grid, self._current
            participation = dict(self._participation)
        owed = grid.owed() if grid is not None else set()
        out: list[cpb.ChildInfo] = []
        for entry in entries:
            info = cpb.ChildInfo(
                name=entry.name,
                node_id=entry.node_id,
                peer=entry.peer,
                agent=entry.agent,
                connected_unix_ms=_ms(entry.connected_at),
            )
            conn = entry.conn
            if conn is None or conn.closed:
                info.state = cpb.CHILD_STATE_GONE
                if conn is None:
                    info.left_reason = entry.left_reason
                    info.last_seen_unix_ms = _ms(entry.last_seen)
                else:  # closing, not yet reported gone
                    info.left_reason = conn.close_reason or "closing"
                    info.last_seen_unix_ms = _ms(_wall(conn.last_seen))
                out.append(info)
                continue
            info.connected = True
            info.busy = conn.busy
            info.last_seen_unix_ms = _ms(_wall(conn.last_seen))
            state, reason = participation.get(entry.node_id, (cpb.CHILD_STATE_IDLE, ""))
            if job is not None and state != cpb.CHILD_STATE_IDLE:
                info.job_id = job.job_id
            info.confirmed = state == cpb.CHILD_STATE_CONFIRMED
            info.decline_reason = reason
            if info.confirmed and entry.node_id in owed:
                state = cpb.CHILD_STATE_IN_ROUND
                info.in_round = True
            info.state = state  # type: ignore[assignment]
            out.append(info)
        out.sort(key=lambda c: (not c.connected, c.name))
        return out

    # -- wire views --------------------------------------------------------------------------------

    def _job_proto(self, job: JobRecord) -> cpb.Job:
        """Under the lock."""
        position = 0
        if job.state == cpb.JOB_STATE_QUEUED:
            position = next((i + 1 for i, j in enumerate(self._queue) if j is job), 0)
        return cpb.Job(
            job_id=job.job_id,
            state=job.state,  # type: ignore[arg-type]
            encoder_type=job.encoder_type,
            spec=job.spec,
            requester=job.requester,
            rounds_done=len(job.rounds),
            round_budget=job.config.rounds,
            stop_reason=job.stop_reason,
            error=job.error,
            cancel_requested=job.cancel_requested,
            queue_position=position,
            created_unix_ms=_ms(job.created),
            started_unix_ms=_ms(job.started),
            finished_unix_ms=_ms(job.finished),
            final_metrics=job.final_metrics,
            encoder_available=job.state == cpb.JOB_STATE_SUCCEEDED and job.checkpoint is not None,
            effective_config=dict_to_struct(job.run_config),
            activity=self._activity(job),
            crashes=job.crashes,
        )

    def _activity(self, job: JobRecord) -> str:
        """Under the lock: what the running job waits for (an operator's first question when
        a job shows no rounds). The grid's lock is only ever taken after this one."""
        if job is not self._current or job.state != cpb.JOB_STATE_RUNNING:
            return ""
        grid = self._grid
        if grid is None:
            return "starting"
        if grid.training:
            owed = len(grid.owed())
            # After the round that stopped the job: the final test of the published encoder.
            last = job.rounds[-1] if job.rounds else None
            where = (
                "final test"
                if last is not None and last.stop_reason
                else f"round {len(job.rounds) + 1}"
            )
            return f"{where}: {owed} {'reply' if owed == 1 else 'replies'} outstanding"
        if not self._participation:
            connected = sum(
                1 for c in self._children.values() if c.conn is not None and not c.conn.closed
            )
            needed = max(job.config.expect_children, job.config.min_children)
            if connected >= needed:  # about to ask them
                return f"asking the {connected} connected children"
            return f"waiting for children: {connected} connected, {needed} needed"
        states = [state for state, _ in self._participation.values()]
        confirmed = states.count(cpb.CHILD_STATE_CONFIRMED)
        pending = states.count(cpb.CHILD_STATE_QUERIED)
        return f"waiting for confirmations: {confirmed} confirmed, {pending} not answered yet"

    def job_proto(self, job: JobRecord) -> cpb.Job:
        with self._cond:
            return self._job_proto(job)

    # -- RPCs -----------------------------------------------------------------------------------

    @staticmethod
    def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
        # Clipped: a message quoting a client's megabyte string would exceed gRPC's 16 KiB of
        # status metadata, and the client would get "Stream removed" instead of the reason.
        context.abort(code, clip(message, STATUS_TEXT_LIMIT))
        raise AssertionError("context.abort returned")  # it raises; this keeps mypy honest

    def _lookup(self, job_id: str, context: Any, list_known: bool = True) -> JobRecord:
        """The job ``job_id``; NOT_FOUND names the latest known ids when ``list_known`` (for
        operators only: to a child, that would be ListJobs by another door)."""
        if not job_id:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "job_id is required")
        job = self.job(job_id)
        if job is None:
            if not list_known:
                self._abort(context, grpc.StatusCode.NOT_FOUND, f"unknown job id {job_id!r}")
            with self._cond:
                ids = list(self._jobs)
            known = ", ".join(ids[-_KNOWN_IDS_SHOWN:]) or "none"
            if len(ids) > _KNOWN_IDS_SHOWN:
                known = f"the latest {_KNOWN_IDS_SHOWN} of {len(ids)}: {known}"
            self._abort(
                context, grpc.StatusCode.NOT_FOUND, f"unknown job id {job_id!r} (jobs: {known})"
            )
        return job

    def _is_operator(self, caller: str) -> bool:
        """Whether a caller may see and do everything ("" = plaintext: nobody is identified)."""
        return not caller or caller in self.operators

    def _caller(self, context: Any, operator: bool) -> str:
        """The verified certificate name of the call's peer ("" without mutual TLS, where the
        master identifies nobody); aborts when the certificate is refused, or when ``operator``
        and it is not one of :attr:`operators`."""
        security = self._server.security
        if security.identify_any is None:
            return ""
        name = self._verified(security.identify_any, context)
        if name is None:
            self._abort(
                context, grpc.StatusCode.UNAUTHENTICATED, "the peer's certificate names no one"
            )
        if name not in self.operators and security.identify is not None:
            # A child of the CA that this master's allowlist does not admit is no child of this
            # federation (one CA may serve several): no Control access either.
            self._verified(security.identify, context)
        if operator and name not in self.operators:
            self._abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate {name!r} is not an operator of this master (operators: "
                f"{', '.join(sorted(self.operators)) or 'none'}): children may request, watch "
                "and download encoders; `fedenc master --serve --operators NAME` names who "
                "may submit, cancel and list",
            )
        return name

    def _verified(self, identify: Identify, context: Any) -> str | None:
        """``identify`` on the call's credentials; a refusal aborts the call with its status."""
        try:
            return identify(context.auth_context() or {})
        except Refused as err:
            self._abort(context, err.code, str(err))

    def _requester(self, context: Any, caller: str, claimed: str, what: str) -> str:
        """Who asked, as kept with a job: the proven name first, the client's own words after
        (aborts for a claim longer than :data:`MAX_REQUESTER`, naming ``what`` was refused)."""
        try:
            _check_requester(claimed)
        except JobSpecError as err:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad {what}: {err}")
        if not caller:
            return claimed
        return clip(f"{caller}: {claimed}" if claimed else caller, MAX_REQUESTER)

    def SubmitJob(self, request: cpb.SubmitJobRequest, context: Any) -> cpb.Job:
        caller = self._caller(context, operator=True)
        requester = self._requester(context, caller, request.requester, "job spec")
        try:
            job = self.submit(request.spec, requester)
        except (JobSpecError, ValueError) as err:  # a NaN in a Struct, too
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad job spec: {err}")
        except ServiceStopped as err:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, str(err))
        return self.job_proto(job)

    def RequestEncoder(
        self, request: fpb.EncoderRequest, context: Any
    ) -> cpb.RequestEncoderResponse:
        caller = self._caller(context, operator=False)
        requester = self._requester(context, caller, request.requester, "encoder request")

        # A child may ask for an encoder (claim 2), not choose what a new job costs.
        choose = self._is_operator(caller)
        try:
            job, started = self.request_encoder(request, requester=requester, choose=choose)
        except NotAllowed as err:
            self._abort(context, grpc.StatusCode.PERMISSION_DENIED, f"{caller!r}: {err}")
        except (JobSpecError, ValueError) as err:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad encoder request: {err}")
        except ServiceStopped as err:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, str(err))
        return cpb.RequestEncoderResponse(job=self.job_proto(job), started=started)

    def GetJob(self, request: cpb.GetJobRequest, context: Any) -> cpb.Job:
        caller = self._caller(context, operator=False)
        return self.job_proto(self._lookup(request.job_id, context, self._is_operator(caller)))

    def ListJobs(self, request: cpb.ListJobsRequest, context: Any) -> cpb.ListJobsResponse:
        self._caller(context, operator=True)
        states = set(request.states)
        bad = sorted(x for x in states if x not in cpb.JobState.values() or x == 0)
        if bad:
            known = ", ".join(f"{v} ({cpb.JobState.Name(v)})" for v in cpb.JobState.values() if v)
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"states {bad} are no job states; use {known}",
            )
        with self._cond:
            jobs = [
                self._job_proto(j) for j in self._jobs.values() if not states or j.state in states
            ]
        return cpb.ListJobsResponse(jobs=jobs)

    def CancelJob(self, request: cpb.CancelJobRequest, context: Any) -> cpb.Job:
        caller = self._caller(context, operator=True)
        job = self._lookup(request.job_id, context)
        self.cancel(job.job_id, clip(request.reason), by=caller)
        return self.job_proto(job)

    def ListChildren(
        self, request: cpb.ListChildrenRequest, context: Any
    ) -> cpb.ListChildrenResponse:
        self._caller(context, operator=True)
        return cpb.ListChildrenResponse(children=self.children())

    def WatchJob(self, request: cpb.WatchJobRequest, context: Any) -> Iterator[cpb.JobEvent]:
        caller = self._caller(context, operator=False)
        job = self._lookup(request.job_id, context, self._is_operator(caller))
        with self._stream_slot(context, caller, "WatchJob"):
            yield from self._watch(job, request, context, caller)

    @contextlib.contextmanager
    def _stream_slot(self, context: Any, caller: str, what: str) -> Iterator[None]:
        """A server thread for a long stream (WatchJob, DownloadEncoder): at most
        :data:`MAX_WATCHERS` at once, and :data:`MAX_CHILD_STREAMS` per non-operator, so that
        neither watchers nor one child can take the threads of everyone else."""
        child = not self._is_operator(caller)
        with self._cond:
            if self._watchers >= MAX_WATCHERS:
                self._abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{MAX_WATCHERS} WatchJob/DownloadEncoder streams are open already; close "
                    "one, or poll GetJob",
                )
            if child and self._streams_of.get(caller, 0) >= MAX_CHILD_STREAMS:
                self._abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{caller!r} has {MAX_CHILD_STREAMS} streams open already ({what})",
                )
            self._watchers += 1
            if child:
                self._streams_of[caller] = self._streams_of.get(caller, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._watchers -= 1
                if child:
                    self._streams_of[caller] -= 1

    def _watch(
        self, job: JobRecord, request: cpb.WatchJobRequest, context: Any, caller: str = ""
    ) -> Iterator[cpb.JobEvent]:
        sent = max(0, int(request.from_round) - 1)
        next_check = time.monotonic() + RECHECK_S
        last_state: int | None = None
        last_activity = ""
        while True:

            def news(
                seen: int = sent, known: int | None = last_state, doing: str = last_activity
            ) -> bool:
                return len(job.rounds) > seen or job.state != known or self._activity(job) != doing

            with self._cond:
                self._cond.wait_for(news, timeout=1.0)  # also to notice a client that went away
                rounds = job.rounds[sent:]
                state = job.state
                snapshot = self._job_proto(job)
            if not context.is_active():
                return
            if caller and time.monotonic() >= next_check:  # revoked while it watches?
                self._caller(context, operator=False)
                next_check = time.monotonic() + RECHECK_S
            if last_state is None or (
                snapshot.activity != last_activity and state not in TERMINAL
            ):  # first, the job as it is now; then whenever what it waits for changes
                yield cpb.JobEvent(job=snapshot)
                last_state = state
            last_activity = snapshot.activity
            for report in rounds:
                yield cpb.JobEvent(round=report)
            sent += len(rounds)
            if state in TERMINAL:  # last: the job in its final state, after its rounds
                yield cpb.JobEvent(job=snapshot)
                return
            if state != last_state:
                yield cpb.JobEvent(job=snapshot)
                last_state = state

    def DownloadEncoder(
        self, request: cpb.DownloadEncoderRequest, context: Any
    ) -> Iterator[cpb.EncoderDownload]:
        caller = self._caller(context, operator=False)
        with self._stream_slot(context, caller, "DownloadEncoder"):
            yield from self._download(request, context, caller)

    def _download(
        self, request: cpb.DownloadEncoderRequest, context: Any, caller: str
    ) -> Iterator[cpb.EncoderDownload]:
        if request.job_id:
            job = self._lookup(request.job_id, context, self._is_operator(caller))
        elif request.encoder_type:
            with self._cond:
                done = [
                    j
                    for j in self._jobs.values()
                    if j.encoder_type == request.encoder_type and j.state == cpb.JOB_STATE_SUCCEEDED
                ]
            if not done:
                self._abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"no finished encoder of type {request.encoder_type!r}; "
                    "ask for one with RequestEncoder",
                )
            job = done[-1]
        else:
            self._abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "give a job_id or an encoder_type"
            )
        max_chunk = request.max_chunk_bytes or DEFAULT_MAX_CHUNK_BYTES
        if not MIN_CHUNK_BYTES <= max_chunk <= DEFAULT_MAX_CHUNK_BYTES:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_chunk_bytes {max_chunk} is outside [{MIN_CHUNK_BYTES}, "
                f"{DEFAULT_MAX_CHUNK_BYTES}] (0: the master's {DEFAULT_MAX_CHUNK_BYTES})",
            )
        with self._cond:
            state, checkpoint = job.state, job.checkpoint
            why = self._no_encoder(job)
        if state != cpb.JOB_STATE_SUCCEEDED or checkpoint is None:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, why)
        try:
            meta = json.loads((checkpoint / META_FILE).read_text())
            # mmap: the tensors are paged in as they are streamed, not loaded whole
            state_dict = atomic.torch_load(checkpoint / STATE_FILE, map_location="cpu", mmap=True)
        except (OSError, ValueError, RuntimeError) as err:
            self._abort(
                context,
                grpc.StatusCode.DATA_LOSS,
                f"the checkpoint of job {job.job_id} cannot be read: {err}",
            )
        try:
            tensors = {name: state_dict[name] for name in job.target_names}
            local = []
            if request.include_local:
                local = [name for name in state_dict if name not in tensors]
                tensors.update({name: state_dict[name] for name in local})
            config = EncoderConfig(**meta["encoder_config"])
            target = {name: tensors[name] for name in job.target_names}
            info = cpb.EncoderInfo(
                job_id=job.job_id,
                encoder=records.encoder_spec(meta["encoder"], config, target),
                rounds=len(job.rounds),
                stop_reason=job.stop_reason,
                final_metrics=job.final_metrics,
                metadata=dict_to_struct(meta),
                local_tensors=local,
            )
        except (KeyError, TypeError, ValueError) as err:  # files changed on disk since
            self._abort(
                context,
                grpc.StatusCode.DATA_LOSS,
                f"the checkpoint of job {job.job_id} does not match its record: {err!r}",
            )
        header, chunks = stream_tensors(
            tensors,
            metadata={"job_id": job.job_id, "encoder": meta["encoder"]},
            max_chunk_bytes=max_chunk,
        )
        yield cpb.EncoderDownload(info=info)
        yield cpb.EncoderDownload(header=header)
        for chunk in chunks:
            if not context.is_active():
                return
            yield cpb.EncoderDownload(chunk=chunk)

    def _no_encoder(self, job: JobRecord) -> str:
        """Why ``job`` has no encoder to download (under the lock)."""
        if job.state == cpb.JOB_STATE_QUEUED:
            return f"job {job.job_id} is queued: its encoder is not trained yet; watch it"
        if job.state == cpb.JOB_STATE_RUNNING:
            return (
                f"job {job.job_id} is running (round {len(job.rounds)} of "
                f"{job.config.rounds or 'no budget'}): its encoder is not ready; watch it"
            )
        if job.state == cpb.JOB_STATE_CANCELLED:
            return f"job {job.job_id} was {job.error}: it has no encoder"
        if job.state == cpb.JOB_STATE_FAILED:
            return f"job {job.job_id} failed ({job.error}): it has no encoder"
        return f"job {job.job_id} saved no encoder checkpoint"


def _enable_reflection(server: grpc.Server) -> bool:
    """gRPC server reflection (``grpcurl`` without ``-proto``) when ``grpcio-reflection`` is
    installed; it is optional: clients generated from ``proto/`` do not need it."""
    try:
        from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        log.debug("grpcio-reflection not installed: no server reflection")
        return False
    names = (
        cpb.DESCRIPTOR.services_by_name["Control"].full_name,
        spb.DESCRIPTOR.services_by_name["Federation"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    return True


def serve_defaults(run_config: Mapping[str, Any], children: int | None, wait: float) -> RunConfig:
    """A served master's job defaults from its scenario's run config: wait for ``children``
    (when given) at most ``wait`` seconds, else start with the children connected."""
    defaults: RunConfig = dict(run_config)
    defaults["expect-children"] = children or 0
    defaults["wait-timeout"] = wait
    return defaults


__all__ = [
    "ControlService",
    "JobCancelled",
    "JobRecord",
    "ServiceStopped",
    "serve_defaults",
]
