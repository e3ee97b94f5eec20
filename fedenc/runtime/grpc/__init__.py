"""fedenc's gRPC runtime: master and children as long-lived processes over one bidirectional
``fedenc.v1.Federation/Connect`` stream per child (``fedenc master``, ``fedenc child``).

One concept per module:

* :mod:`~fedenc.runtime.grpc.transport`: protocol version, capabilities, gRPC options
  (frame limits, keepalive), the TLS / identity seam;
* :mod:`~fedenc.runtime.grpc.frames`: Flower ``Message`` <-> ``FlowerMessage`` + ``TensorChunk``
  frames, and the validating inbound assembler;
* :mod:`~fedenc.runtime.grpc.connection`: the master's end of one child's stream;
* :mod:`~fedenc.runtime.grpc.master`: the server, the Flower ``Grid`` over the streams, and
  :func:`~fedenc.runtime.grpc.master.run_server_app`;
* :mod:`~fedenc.runtime.grpc.child`: the child's stream, heartbeats, reconnects and ClientApp
  loop;
* :mod:`~fedenc.runtime.grpc.launcher`: a master and K child processes on 127.0.0.1 for one
  scenario (``fedenc simulate --processes``).

Nothing is imported here, so importing the package stays cheap.
"""
