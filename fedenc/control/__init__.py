"""The Control API (``fedenc.v1.Control``, ``proto/fedenc/v1/control.proto``): jobs, encoders and
children of a master for any gRPC client.

* :mod:`fedenc.control.spec`: a ``JobSpec`` as the master's run config, checked before it queues;
  round reports on the wire.
* :mod:`fedenc.control.service`: the master's job queue and the service next to Federation.
* :mod:`fedenc.control.client`: a Python client (``fedenc train --master``).
"""
