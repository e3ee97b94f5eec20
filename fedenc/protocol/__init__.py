"""fedenc's wire protocol on the Python side.

* :mod:`fedenc.protocol.tensors`: torch tensors <-> ``fedenc.v1`` Tensor / ParameterSet messages;
* :mod:`fedenc.protocol.chunking`: parameter sets streamed as TensorChunk messages and reassembled;
* :mod:`fedenc.protocol.codegen`: regenerates the committed code in :mod:`fedenc.proto`
  (``make proto``).

The generated messages live in ``fedenc.proto.fedenc.v1`` (for example
``fedenc.proto.fedenc.v1.tensor_pb2``). This package imports nothing on its own, so that
``python -m fedenc.protocol.codegen`` needs neither torch nor the generated code.
"""
