"""`kvevict` commands of this service."""


def add_commands(subparsers) -> None:
    """Registers this service's commands (filled in by the service)."""
