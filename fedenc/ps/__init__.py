"""The two-level parameter server (patent US20210357814A1).

* :mod:`.routing` maps keys to shards (a stable hash);
* :mod:`.optimizers` are the row optimizers a shard applies to pushed deltas;
* :mod:`.table` is one shard's storage (validation, counters, snapshot and restore);
* :mod:`.service` is the interface every distributed PS offers, :mod:`.inprocess` the in-process
  one, :mod:`.server` / :mod:`.client` the gRPC shard and the sharded client;
* :mod:`.builtin` is the trainer's built-in PS and :mod:`.trainer` the trainer that uses it;
* :mod:`.federation` wires both into the federation (placements a and b), :mod:`.sparse` is
  placement b's sparse row updates and their row-wise fusion; :mod:`.cli` is ``fedenc ps``.

See ``docs/ps.md``.
"""
