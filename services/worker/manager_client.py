"""How the worker talks to a cache manager.

`ManagerClient` is the transport-neutral interface: the protobuf requests and responses of
`CacheManagerService`. `EmbeddedManagerClient` runs the manager in-process with in-memory state;
it serializes every message as the network would, so embedded and remote sessions exchange the
same bytes and a gRPC transport only has to send them.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from google.protobuf.message import Message

from kvevict.cache_manager.service import ManagerCore
from kvevict.cache_manager.state import InMemoryStateStore
from kvevict.v1 import cache_manager_pb2 as pb

M = TypeVar("M", bound=Message)


class ManagerClient(Protocol):
    """The calls of `kvevict.v1.CacheManagerService` the worker makes."""

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse: ...

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse: ...

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse: ...


class EmbeddedManagerClient:
    """An in-process manager with in-memory session state (the default of the demo)."""

    def __init__(self, core: ManagerCore | None = None) -> None:
        self.core = core or ManagerCore(InMemoryStateStore())

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        return self._call(self.core.open_session, request, pb.OpenSessionResponse)

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        return self._call(self.core.report_block, request, pb.ReportBlockResponse)

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return self._call(self.core.close_session, request, pb.CloseSessionResponse)

    def _call(self, handler, request: Message, response_type: type[M]) -> M:
        response = handler(type(request).FromString(request.SerializeToString()))
        return response_type.FromString(response.SerializeToString())
