"""A trainer process for the fault tests: trains with the gRPC PS (exchange every 300 samples),
prints the PS state right after its 2nd exchange, trains one more batch (mid-window), prints
MID and waits to be killed. Usage: python trainer_process.py ADDRESS [ADDRESS...]"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.encoders.registry import build_encoder
from fedenc.ps.client import ShardedClient
from fedenc.ps.trainer import PSConfig, PSTrainer
from fedenc.training.config import TrainConfig


def main() -> None:
    torch.set_num_threads(1)
    client = ShardedClient(sys.argv[1:])
    splits = generate(SyntheticConfig(num_sessions=600, num_items=client.num_keys - 1, seed=1))
    torch.manual_seed(0)
    model = build_encoder("srgnn", client.num_keys - 1, hidden=client.width)
    trainer = PSTrainer(
        model, TrainConfig(epochs=1, batch_size=100, device="cpu"), client, PSConfig(300)
    )
    builtin = trainer.builtin
    every = np.arange(client.num_keys)
    exchange, count = builtin.exchange, builtin.count

    def hooked_exchange(forced: bool = False) -> None:
        exchange(forced)
        if builtin.stats.exchanges == 2:
            state = {
                "versions": [s["version"] for s in client.stats()],
                "sum": float(client.pull(every).double().sum()),
            }
            print(json.dumps(state), flush=True)

    def hooked_count(samples: int) -> bool:
        done = count(samples)
        if builtin.stats.exchanges == 2 and builtin.since_exchange > 0:
            print("MID", flush=True)  # trained past exchange 2, nothing pushed since
            time.sleep(600)
        return done

    builtin.exchange = hooked_exchange  # type: ignore[method-assign]
    builtin.count = hooked_count  # type: ignore[method-assign]
    trainer.train_epoch(Examples.from_sessions(splits.train))
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main()
