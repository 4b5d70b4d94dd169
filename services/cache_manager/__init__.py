"""Cache manager: eviction policies, CAOTE, budgets and session state (no transport inside)."""
