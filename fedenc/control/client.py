"""A Python client of ``fedenc.v1.Control`` (what ``fedenc train --master`` uses).

Any gRPC language works the same way from ``proto/`` alone (docs/control-api.md); this client
adds what fedenc users want on top: RPC failures as :class:`ControlError` with the master's
message, and a downloaded encoder turned into a fedenc checkpoint that
:func:`~fedenc.training.checkpoint.load_checkpoint` reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fedenc.control.spec import struct_to_dict
from fedenc.encoders.registry import build_encoder
from fedenc.federation.records import encoder_config_from_spec
from fedenc.proto.fedenc.v1 import control_pb2 as cpb
from fedenc.proto.fedenc.v1 import control_pb2_grpc as cgrpc
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.protocol.chunking import ParameterSetAssembler
from fedenc.runtime.grpc.transport import ChannelSecurity, channel_options, parse_address
from fedenc.training.checkpoint import save_checkpoint


class ControlError(RuntimeError):
    """A Control RPC failed; ``code`` is the gRPC status, the message the master's reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def of(cls, err: grpc.RpcError, address: str) -> ControlError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"the master at {address} is unreachable ({details})"
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            details = (
                f"the master at {address} does not serve the Control API "
                "(start it with `fedenc master --serve`)"
            )
        return cls(code, details)


@dataclass
class Download:
    """A downloaded encoder: what it is, and every tensor by name (target first)."""

    info: cpb.EncoderInfo
    tensors: dict[str, torch.Tensor]
    wire_bytes: int

    def save(self, out: Path) -> Path:
        """A fedenc checkpoint of the encoder (needs ``include_local`` for the full state)."""
        spec = self.info.encoder
        config = encoder_config_from_spec(spec).to_dict()
        num_items = int(config.pop("num_items"))
        model = build_encoder(spec.type, num_items, **config)
        missing = set(model.state_dict()) - set(self.tensors)
        if missing:
            raise ValueError(
                f"the download lacks {len(missing)} tensor(s) of the encoder "
                f"(e.g. {sorted(missing)[0]!r}): download with include_local"
            )
        model.load_state_dict(self.tensors, strict=True)
        control = {"job_id": self.info.job_id, "downloaded_from": "fedenc.v1.Control"}
        metadata = struct_to_dict(self.info.metadata)
        extra = {k: v for k, v in metadata.items() if k not in ("format", "encoder")}
        extra.pop("encoder_config", None)
        extra.pop("shared_parameters", None)
        return save_checkpoint(out, model, {**extra, "control": control})


class ControlClient:
    """One channel to a master's Control service."""

    def __init__(
        self,
        address: str,
        security: ChannelSecurity,
        *,
        timeout: float = 30.0,
    ) -> None:
        parse_address(address)
        security.check()
        self.address = address
        self.timeout = timeout
        self._channel = security.channel(address, channel_options())
        self._stub = cgrpc.ControlStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, wait_for_ready=False)
        except grpc.RpcError as err:
            raise ControlError.of(err, self.address) from None

    def submit(self, spec: cpb.JobSpec, requester: str = "") -> cpb.Job:
        request = cpb.SubmitJobRequest(spec=spec, requester=requester)
        return self._call(self._stub.SubmitJob, request)  # type: ignore[no-any-return]

    def request_encoder(self, request: fpb.EncoderRequest) -> cpb.RequestEncoderResponse:
        return self._call(self._stub.RequestEncoder, request)  # type: ignore[no-any-return]

    def job(self, job_id: str) -> cpb.Job:
        return self._call(self._stub.GetJob, cpb.GetJobRequest(job_id=job_id))  # type: ignore[no-any-return]

    def jobs(self) -> list[cpb.Job]:
        return list(self._call(self._stub.ListJobs, cpb.ListJobsRequest()).jobs)

    def children(self) -> list[cpb.ChildInfo]:
        return list(self._call(self._stub.ListChildren, cpb.ListChildrenRequest()).children)

    def cancel(self, job_id: str, reason: str = "") -> cpb.Job:
        return self._call(  # type: ignore[no-any-return]
            self._stub.CancelJob, cpb.CancelJobRequest(job_id=job_id, reason=reason)
        )

    def watch(self, job_id: str, from_round: int = 0) -> Iterator[cpb.JobEvent]:
        """The job's events until it ends (no deadline: a job may train for hours)."""
        try:
            yield from self._stub.WatchJob(
                cpb.WatchJobRequest(job_id=job_id, from_round=from_round)
            )
        except grpc.RpcError as err:
            raise ControlError.of(err, self.address) from None

    def download(
        self, job_id: str = "", *, encoder_type: str = "", include_local: bool = False
    ) -> Download:
        """The encoder of ``job_id`` (or the latest of ``encoder_type``), reassembled."""
        request = cpb.DownloadEncoderRequest(
            job_id=job_id, encoder_type=encoder_type, include_local=include_local
        )
        info: cpb.EncoderInfo | None = None
        assembler: ParameterSetAssembler | None = None
        wire = 0
        try:
            for part in self._stub.DownloadEncoder(request):
                wire += part.ByteSize()
                kind = part.WhichOneof("part")
                if kind == "info":
                    info = part.info
                elif kind == "header":
                    assembler = ParameterSetAssembler(part.header)
                elif kind == "chunk" and assembler is not None:
                    assembler.add(part.chunk)
                else:
                    raise ValueError(f"unexpected {kind or 'empty'} message in the download")
        except grpc.RpcError as err:
            raise ControlError.of(err, self.address) from None
        if info is None or assembler is None:
            raise ValueError("the download ended before its info and header")
        return Download(info, assembler.finish(), wire)


__all__ = ["ControlClient", "ControlError", "Download"]
