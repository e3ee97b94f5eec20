"""Generated protobuf code for the ``fedenc.v1`` wire contract in ``proto/``.

Do not edit: ``make proto`` regenerates it (:mod:`fedenc.protocol.codegen`), and a test
fails when it is stale. Import messages as
``from fedenc.proto.fedenc.v1 import tensor_pb2``.
"""
