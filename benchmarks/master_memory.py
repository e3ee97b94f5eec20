"""Peak master memory while fusing K children's updates of a large encoder over gRPC (issue 4).

The master (a fresh process per measurement, so its peak RSS is its own) sends a parameter set
of ``--gib`` GiB to K child processes over loopback (``fedenc child``, an app that echoes the
set at once, so all K replies arrive together: the worst case), and folds each reply as it
arrives with the ``weighted_sum`` rule, as the master's job loop does (``grid.receive`` ->
``record_to_params`` -> ``rule.add``). Reported: the master's peak RSS above its RSS once the
target and the outgoing record exist, in units of one model. Streaming with inbound admission
(the default, ``inbound_slots = 1``) should need about one model for the fold plus one reply in
assembly; without admission (``--slots 0``) K replies can be in assembly at once.

    python benchmarks/master_memory.py                          # 8 children x 1 GiB, slots 1
    python benchmarks/master_memory.py --gib 0.25 --compare     # slots 1 against slots 0

The children's own peak RSS is printed too (each holds a received copy to echo).
``SIDE_BY_SIDE=1`` sends the encoder to the children side by side instead of in send turns
(:mod:`fedenc.runtime.grpc.send_turns`); an environment variable, as each measurement runs in a
fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TENSORS = 8


def _hwm_mib() -> float:
    """Peak RSS since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    """Reset the peak-RSS mark to the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_mib(pid: int | None = None) -> float:
    path = f"/proc/{pid or 'self'}/statm"
    with open(path) as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(gib: float, children: int, slots: int) -> dict[str, float]:
    """One master run in this process (call in a fresh process)."""
    import numpy as np
    import torch
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedenc.federation.fusion import build_fusion_rule
    from fedenc.federation.records import params_to_record, record_to_params
    from fedenc.runtime import flower_compat as fc
    from fedenc.runtime.grpc.master import FederationServer, GrpcGrid
    from fedenc.runtime.grpc.send_turns import DEFAULT_PATIENCE
    from fedenc.runtime.grpc.transport import ServerSecurity

    sys.path.insert(0, str(HERE))
    from grpc_runtime import start_children, stop

    per = int(gib * 2**30) // 4 // TENSORS
    gen = np.random.default_rng(0)
    target = {
        f"layer{i}.weight": torch.from_numpy(gen.standard_normal(per, dtype=np.float32))
        for i in range(TENSORS)
    }
    model_mib = sum(t.numel() * 4 for t in target.values()) / 2**20
    record = params_to_record(target)
    content = RecordDict({"arrays": record, "config": ConfigRecord({"train-seconds": 0.0})})
    server = FederationServer(
        "127.0.0.1:0",
        ServerSecurity(insecure=True),
        inbound_slots=slots,
        send_patience=None if os.environ.get("SIDE_BY_SIDE") else DEFAULT_PATIENCE,
    ).start()
    procs = start_children(server.address, children, "grpc_runtime:bench_app")
    child_peak: dict[int, float] = {}
    done = threading.Event()

    def watch_children() -> None:
        while not done.is_set():
            for p in procs:
                try:
                    child_peak[p.pid] = max(child_peak.get(p.pid, 0.0), _rss_mib(p.pid))
                except OSError:
                    pass
            time.sleep(0.05)

    threading.Thread(target=watch_children, daemon=True).start()
    try:
        assert server.wait_for_children(children, 180), "children did not connect"
        grid = GrpcGrid(server, 1)
        setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _reset_hwm()  # the fold's own peak, not the setup's
        base = _rss_mib()
        rule = build_fusion_rule("weighted_sum")
        rule.begin(1, target)
        with fc.task_identity(1):
            msgs = [Message(content, nid, "train") for nid in grid.get_node_ids()]
        t0 = time.perf_counter()
        ids = grid.push_messages(msgs)
        folded = 0
        for reply in grid.receive(ids, timeout=900):
            assert not reply.has_error(), reply.error
            name = f"node-{reply.metadata.src_node_id}"
            rule.add(name, record_to_params(reply.content["arrays"], name), 100)
            folded += 1
            del reply
        fused = rule.result()
        seconds = time.perf_counter() - t0
        assert folded == children and all(torch.allclose(fused[k], target[k]) for k in target)
        peak = _hwm_mib()
    finally:
        done.set()
        server.stop("benchmark over")
        stop(procs)
    return {
        "model_mib": model_mib,
        "base_mib": base,
        "peak_mib": peak,
        "setup_peak_mib": setup_peak,
        "above_mib": peak - base,
        "seconds": seconds,
        "child_peak_mib": max(child_peak.values()) if child_peak else float("nan"),
        "children": children,
        "slots": slots,
    }


def run_fresh(gib: float, children: int, slots: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--one", "--gib", str(gib), "--children", str(children)]
    cmd += ["--slots", str(slots)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="encoder size in GiB")
    ap.add_argument("--children", type=int, default=8)
    ap.add_argument("--slots", type=int, default=1, help="master inbound slots (0 = no limit)")
    ap.add_argument("--compare", action="store_true", help="also run with --slots 0")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.one:
        print(json.dumps(measure(args.gib, args.children, args.slots)))
        return
    sys.path.insert(0, str(HERE))
    from _common import load_avg

    print(
        f"master memory: {args.children} children echo a {args.gib:g} GiB encoder at once over "
        f"loopback gRPC; weighted_sum folds each reply as it arrives; load avg {load_avg()}"
    )
    runs = [args.slots] + ([0] if args.compare and args.slots != 0 else [])
    print(f"{'inbound slots':>14} {'model MiB':>10} {'peak above setup':>17} {'= models':>9}"
          f" {'round s':>8} {'child peak MiB':>15}")  # fmt: skip
    for slots in runs:
        r = run_fresh(args.gib, args.children, slots)
        print(
            f"{slots or 'no limit':>14} {r['model_mib']:>10.0f} {r['above_mib']:>13.0f} MiB"
            f" {r['above_mib'] / r['model_mib']:>9.2f} {r['seconds']:>8.1f}"
            f" {r['child_peak_mib']:>15.0f}"
        )


if __name__ == "__main__":
    main()
