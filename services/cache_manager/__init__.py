"""Cache manager: eviction policies, CAOTE, budgets and session state (no transport inside)."""

from kvevict.cache_manager.errors import Aborted, InvalidArgument, ManagerError, NotFound
from kvevict.cache_manager.registry import describe_policies, format_policies
from kvevict.cache_manager.service import ManagerCore
from kvevict.cache_manager.state import InMemoryStateStore, SessionState, StateStore
from kvevict.cache_manager.wrappers import caote_scores

__all__ = [
    "Aborted", "InMemoryStateStore", "InvalidArgument", "ManagerCore", "ManagerError", "NotFound",
    "SessionState", "StateStore", "caote_scores", "describe_policies", "format_policies",
]
