"""Elastic, fault-tolerant local training (patent US20210406767A1).

* :mod:`.task_server`: the task-information server (registration, heartbeats, assignment,
  the journal of recorded batch ids);
* :mod:`.data_server`: a data server (its data shard, the optimizer, the parameters in a PS
  table, the batches it sends to computing servers);
* :mod:`.worker`: a stateless computing server (gradients of one batch at a time);
* :mod:`.site`: all three on one machine, as ``fedenc child --workers N`` runs them;
* :mod:`.cli`: ``fedenc elastic task-server | data-server | worker`` for multi-machine sites.

Contract: ``proto/fedenc/v1/elastic.proto``. Guide: ``docs/elastic.md``.
"""
