"""The gRPC runtime's cost on loopback, next to plain gRPC measured in the same run.

1. Round overhead: a 10M-parameter encoder (40 MB of float32 shared tensors) sent by the master's
   Grid to 4 child processes, each "training" for a fixed time (a sleep, so the children do not
   fight the master for the cores), and sent back. Overhead = round time - the slowest child's
   local training. Baseline: the same bytes (40 MB down and 40 MB up per child, 4 MiB frames)
   over a plain gRPC bidirectional stream to 4 client processes, no Flower, no codec.
2. Small-message round trip master -> child -> master (a Flower ``query`` with a tiny
   ConfigRecord, one child): p50 / p99 against a ping-pong of tiny frames on a plain stream.

Both are measured twice in the same run: fedenc in plaintext (``--insecure``) and over mutual
TLS (a throwaway CA, certificates from fedenc.security, as ``fedenc simulate --processes``
makes them), each against the plain-gRPC baseline in the same mode (mutual TLS with the same
kind of certificates).

All runtimes are up at once and their rounds alternate (plain, fedenc, fedenc over TLS, plain,
...), so load from other work hits each alike. Medians over the rounds (after a warm-up).
Run: ``python benchmarks/grpc_runtime.py``
(``--rounds``, ``--pings``, ``--params``, ``--children``, ``--train-seconds``, ``--no-tls``;
``--side-by-side`` adds plaintext fedenc without send turns, :mod:`fedenc.runtime.grpc.send_turns`,
as a third pair).
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

HERE = Path(__file__).resolve().parent
FRAME = 4 * 1024 * 1024 - 64 * 1024
OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


# -- the children's ClientApp (loaded by `fedenc child --app grpc_runtime:bench_app`) -------------


def bench_app(msg: Message, ctx: Context) -> Message:
    """``train``: sleep ``train-seconds`` (the local training), return the received arrays;
    anything else: a tiny reply."""
    if msg.metadata.message_type != "train":
        return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)
    t0 = time.perf_counter()
    time.sleep(float(msg.content["config"]["train-seconds"]))
    spent = time.perf_counter() - t0
    out = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"train": spent})})
    return Message(out, reply_to=msg)


# -- plain gRPC baseline ------------------------------------------------------------------------


def _baseline_client(address: str, certs: str | None = None, name: str = "") -> None:
    """Echo: for each burst the server announces (first frame = 8-byte size), receive that many
    bytes, then send the same number back in FRAME-sized frames. With ``certs``: mutual TLS with
    child ``name``'s certificate, as a fedenc child dials."""
    out: queue.Queue[bytes | None] = queue.Queue()
    if certs:
        from fedenc.security.credentials import load_child_tls

        tls = load_child_tls(Path(certs), name)
        channel = grpc.secure_channel(address, tls.credentials, options=OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=OPTIONS)
    call = channel.stream_stream("/bench.Plain/Echo")(iter(out.get, None))
    out.put(b"hello")
    want = received = 0
    for data in call:
        if want == 0:
            want, received = int.from_bytes(data[:8], "little"), len(data) - 8
        else:
            received += len(data)
        if received >= want:
            payload = b"\x01" * min(FRAME, want)
            sent = 0
            while sent < want:
                n = min(FRAME, want - sent)
                out.put(payload[:n])
                sent += n
            want = 0
    out.put(None)


class PlainServer:
    """The baseline's server: pushes a burst of N bytes to every client and waits for N back."""

    def __init__(self, clients: int, certs: Path | None = None) -> None:
        self.clients = clients
        self.streams: list[tuple[queue.Queue[bytes | None], queue.Queue[int]]] = []
        self.ready = threading.Semaphore(0)
        self.server = grpc.server(ThreadPoolExecutor(clients + 4), options=OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "bench.Plain", {"Echo": grpc.stream_stream_rpc_method_handler(self._echo)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        if certs is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:  # the master's certificate, client certificates required: fedenc's mutual TLS
            from fedenc.security.credentials import load_master_tls

            credentials = load_master_tls(certs).credentials
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def _echo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        out: queue.Queue[bytes | None] = queue.Queue()
        back: queue.Queue[int] = queue.Queue()

        def read() -> None:
            next(requests)  # hello
            self.streams.append((out, back))
            self.ready.release()
            for data in requests:
                back.put(len(data))

        threading.Thread(target=read, daemon=True).start()
        yield from iter(out.get, None)

    def burst(self, nbytes: int) -> float:
        """Seconds to push ``nbytes`` to every client and get ``nbytes`` back from each."""
        payload = b"\x00" * FRAME
        t0 = time.perf_counter()
        for out, _ in self.streams:

            def frames(out: queue.Queue[bytes | None] = out) -> None:
                first = True
                sent = 0
                while sent < nbytes:
                    n = min(FRAME, nbytes - sent)
                    head = nbytes.to_bytes(8, "little") if first else b""
                    out.put(head + payload[:n])
                    sent += n
                    first = False

            frames()
        for _, back in self.streams:
            got = 0
            while got < nbytes:
                got += back.get()
        return time.perf_counter() - t0

    def stop(self) -> None:
        for out, _ in self.streams:
            out.put(None)
        self.server.stop(1)


# -- measurements ---------------------------------------------------------------------------------


def start_children(
    address: str, k: int, app: str | None, certs: Path | None = None
) -> list[subprocess.Popen[bytes]]:
    from fedenc.runtime.grpc.launcher import child_command, child_env

    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])
    procs = []
    for i in range(k):
        if app is None:
            cmd = [sys.executable, str(Path(__file__)), "--baseline-client", address]
            if certs is not None:
                cmd += ["--baseline-certs", str(certs), "--baseline-name", f"bench-{i}"]
        else:
            cmd = child_command(
                address,
                f"bench-{i}",
                certs=certs,
                options=["--app", app, "--log-level", "warning"],
            )
        procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def encoder_record(params: int) -> ArrayRecord:
    """``params`` float32 values in 10 tensors, like an encoder's shared layers."""
    rng = np.random.default_rng(0)
    per = params // 10
    return ArrayRecord(
        {f"layer{i}.weight": Array(rng.standard_normal(per, dtype=np.float32)) for i in range(10)}
    )


class FedencRun:
    """The fedenc runtime: a FederationServer, its Grid and ``children`` child processes."""

    def __init__(self, args: argparse.Namespace, tls: bool = False, turns: bool = True) -> None:
        from contextlib import ExitStack

        from fedenc.runtime.grpc.launcher import prepare_certs
        from fedenc.runtime.grpc.master import FederationServer, GrpcGrid
        from fedenc.runtime.grpc.security import server_security
        from fedenc.runtime.grpc.transport import ServerSecurity
        from fedenc.security.credentials import load_master_tls

        self.stack = ExitStack()
        certs: Path | None = None
        security = ServerSecurity(insecure=True)
        if tls:
            names = [f"bench-{i}" for i in range(args.children)]
            certs = prepare_certs(names, None, self.stack)
            security = server_security(load_master_tls(certs, allowlist=names))
        patience = {} if turns else {"send_patience": None}  # None: the old side-by-side sends
        self.server = FederationServer("127.0.0.1:0", security, **patience).start()
        self.procs = start_children(
            self.server.address, args.children, "grpc_runtime:bench_app", certs
        )
        assert self.server.wait_for_children(args.children, 120), "children did not connect"
        self.grid = GrpcGrid(self.server, 1)
        self.content = RecordDict(
            {
                "arrays": encoder_record(args.params),
                "config": ConfigRecord({"train-seconds": args.train_seconds}),
            }
        )
        self.nodes = self.grid.get_node_ids()

    def round(self) -> tuple[float, float]:
        """(round seconds, round seconds minus the slowest child's training)."""
        from fedenc.runtime import flower_compat as fc

        with fc.task_identity(1):
            msgs = [Message(self.content, nid, "train") for nid in self.nodes]
        t0 = time.perf_counter()
        replies = self.grid.send_and_receive(msgs, timeout=300)
        seconds = time.perf_counter() - t0
        assert len(replies) == len(self.nodes) and not any(m.has_error() for m in replies)
        slowest = max(float(m.content["metrics"]["train"]) for m in replies)
        return seconds, seconds - slowest

    def ping(self) -> float:
        from fedenc.runtime import flower_compat as fc

        with fc.task_identity(1):
            msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), self.nodes[0], "query")
        t0 = time.perf_counter()
        (reply,) = self.grid.send_and_receive([msg], timeout=30)
        assert not reply.has_error()
        return time.perf_counter() - t0

    def close(self) -> None:
        shared = self.server.shared_frames
        print(f"  (master chunk frames: {shared.hits} shared, {shared.misses} serialized)")
        self.server.stop("benchmark over")
        stop(self.procs)
        self.stack.close()


class PlainRun:
    """The baseline: the same bytes over plain gRPC streams to ``children`` echo processes
    (mutual TLS with fedenc's certificates when ``tls``)."""

    def __init__(self, args: argparse.Namespace, tls: bool = False) -> None:
        from contextlib import ExitStack

        from fedenc.runtime.grpc.launcher import prepare_certs

        self.stack = ExitStack()
        names = [f"bench-{i}" for i in range(args.children)]
        certs = prepare_certs(names, None, self.stack) if tls else None
        self.server = PlainServer(args.children, certs)
        self.procs = start_children(f"127.0.0.1:{self.server.port}", args.children, None, certs)
        for _ in range(args.children):
            assert self.server.ready.acquire(timeout=120), "baseline clients did not connect"
        self.nbytes = (args.params // 10) * 4 * 10

    def round(self) -> float:
        return self.server.burst(self.nbytes)

    def ping(self) -> float:
        streams, self.server.streams = self.server.streams, self.server.streams[:1]
        try:
            return self.server.burst(16)
        finally:
            self.server.streams = streams

    def close(self) -> None:
        self.server.stop()
        stop(self.procs)
        self.stack.close()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pings", type=int, default=300)
    ap.add_argument("--train-seconds", type=float, default=1.0)
    ap.add_argument("--no-tls", action="store_true", help="skip the mutual-TLS measurement")
    ap.add_argument(
        "--side-by-side",
        action="store_true",
        help="also run plaintext fedenc sending large messages side by side (no send turns)",
    )
    ap.add_argument("--baseline-client", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-certs", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-name", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_client:
        _baseline_client(args.baseline_client, args.baseline_certs, args.baseline_name)
        return
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.path.insert(0, str(HERE))
    from _common import load_avg

    mb = args.params * 4 / 1e6
    print(
        f"gRPC runtime on loopback: {args.children} child processes, {args.params / 1e6:g}M "
        f"float32 parameters ({mb:.0f} MB each way per child), local training "
        f"{args.train_seconds:g} s; {os.cpu_count()} cores, load avg {load_avg()}"
    )
    # Every runtime is up at once and the rounds alternate between them, so a burst of load from
    # other work on the machine hits the baselines and fedenc alike. Each fedenc mode is compared
    # with plain gRPC in the same mode (plaintext / mutual TLS with the same certificates).
    labels = ["plaintext"] + (["side by side"] if args.side_by_side else [])
    labels += [] if args.no_tls else ["mutual TLS"]
    pairs = {
        label: (
            PlainRun(args, tls=label == "mutual TLS"),
            FedencRun(args, tls=label == "mutual TLS", turns=label != "side by side"),
        )
        for label in labels
    }
    stats = {
        label: {"plain": [], "plain_rtt": [], "round": [], "overhead": [], "rtt": []}
        for label in labels
    }
    try:
        for r in range(args.rounds + 1):  # round 0 warms up
            for label, (plain, ours) in pairs.items():
                base = plain.round()
                seconds, overhead = ours.round()
                if r:
                    stats[label]["plain"].append(base)
                    stats[label]["round"].append(seconds)
                    stats[label]["overhead"].append(overhead)
        for i in range(args.pings + 20):
            for label, (plain, ours) in pairs.items():
                base, rtt = plain.ping(), ours.ping()
                if i >= 20:
                    stats[label]["plain_rtt"].append(base)
                    stats[label]["rtt"].append(rtt)
    finally:
        for plain, ours in pairs.values():
            plain.close()
            ours.close()
    med = statistics.median
    moved = 2 * args.children * mb
    print(f"\nround (median of {args.rounds}; {moved:.0f} MB moved per round):")
    for label, st in stats.items():
        paired = [o / b for o, b in zip(st["overhead"], st["plain"], strict=True)]
        print(f"  {label}:")
        print(f"    plain gRPC stream, same bytes       {med(st['plain']):7.3f} s")
        print(f"    fedenc round, total                 {med(st['round']):7.3f} s")
        print(
            f"    fedenc round overhead               {med(st['overhead']):7.3f} s"
            f"   = {med(st['overhead']) / med(st['plain']):.2f} x plain gRPC"
            f" (median of the rounds' own ratios {med(paired):.2f}; goal <= 1.3)"
        )
    print(f"\nsmall-message round trip, one child ({args.pings} after 20 warm-up):")
    for label, st in stats.items():
        print(
            f"  {label:12s} plain gRPC ping-pong  p50 {pct(st['plain_rtt'], 50) * 1e3:6.2f} ms"
            f"   p99 {pct(st['plain_rtt'], 99) * 1e3:6.2f} ms"
        )
        print(
            f"  {label:12s} fedenc Grid query     p50 {pct(st['rtt'], 50) * 1e3:6.2f} ms"
            f"   p99 {pct(st['rtt'], 99) * 1e3:6.2f} ms   (goal p50 < 5 ms)"
        )


if __name__ == "__main__":
    main()
