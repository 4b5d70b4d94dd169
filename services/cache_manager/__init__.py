"""Cache manager: eviction policies, CAOTE, budgets and session state (no transport inside).

The gRPC server is `kvevict.cache_manager.server` and the Redis store
`kvevict.cache_manager.redis_store`; neither is imported here, so the embedded manager needs
neither grpc.aio nor redis.
"""

from kvevict.cache_manager.errors import (
    Aborted, FailedPrecondition, InvalidArgument, ManagerError, NotFound, ResourceExhausted, StoreUnavailable,
)
from kvevict.cache_manager.registry import describe_policies, format_policies
from kvevict.cache_manager.service import AsyncManagerCore, ManagerCore
from kvevict.cache_manager.state import (
    AsyncInMemoryStateStore, AsyncStateStore, InMemoryStateStore, SessionState, StateStore, Transition,
)
from kvevict.cache_manager.wrappers import caote_scores

__all__ = [
    "Aborted", "AsyncInMemoryStateStore", "FailedPrecondition", "AsyncManagerCore", "AsyncStateStore", "InMemoryStateStore",
    "InvalidArgument", "ManagerCore", "ManagerError", "NotFound", "ResourceExhausted", "SessionState",
    "StateStore", "StoreUnavailable", "Transition", "caote_scores", "describe_policies", "format_policies",
]
