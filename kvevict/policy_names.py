"""The one spelling of a policy: `<base>` or `<wrapper>+<base>`, the wrapper first as it wraps the
base (`tova`, `caote+h2o`, `fastcaote+snapkv`).

Every producer (summary titles, benchmark tables, load-generator logs) writes it with
`format_policy` and every parser (`--policy`, `--policies`) reads it with `parse_policy`, which
accepts nothing else: no reversed order, no `none+`, no surrounding spaces.

    >>> parse_policy("caote+h2o")
    ('h2o', 'caote')
    >>> format_policy("h2o", "caote"), format_policy("tova", "none")
    ('caote+h2o', 'tova')
"""

from __future__ import annotations

SEPARATOR = "+"
NO_WRAPPER = "none"


def format_policy(base: str, wrapper: str = NO_WRAPPER) -> str:
    """`caote+h2o` for base h2o under CAOTE; the base alone without a wrapper ("" or "none")."""
    return base if wrapper in ("", NO_WRAPPER) else f"{wrapper}{SEPARATOR}{base}"


def parse_policy(text: str, option: str = "--policy") -> tuple[str, str]:
    """(base, wrapper) of `text` (wrapper "none" when it has none); ValueError names `option`
    and says what to write instead."""
    bases, wrappers = _known()
    parts = text.split(SEPARATOR)
    if len(parts) > 2:
        raise ValueError(f"{option}: {text!r} has more than one {SEPARATOR!r}; write a base policy or "
                         f"<wrapper>{SEPARATOR}<base>, e.g. caote{SEPARATOR}h2o")
    wrapper, base = parts if len(parts) == 2 else (NO_WRAPPER, parts[0])
    if len(parts) == 2 and wrapper == NO_WRAPPER:
        raise ValueError(f"{option}: {text!r}: without a wrapper write the base alone: {base!r}")
    if wrapper in bases and base in wrappers:
        raise ValueError(f"{option}: {text!r}: the wrapper comes first: {format_policy(wrapper, base)!r}")
    if len(parts) == 2 and wrapper not in wrappers:
        raise ValueError(f"{option}: {text!r}: unknown wrapper {wrapper!r}; known: "
                         f"{', '.join(w for w in wrappers if w != NO_WRAPPER)}")
    if base not in bases:
        raise ValueError(f"{option}: {text!r}: unknown base policy {base!r}; known: {', '.join(bases)} "
                         f"(`kvevict policies` describes them)")
    return base, wrapper


def parse_policies(text: str, option: str = "--policies") -> list[tuple[str, str]]:
    """A comma-separated list of policies, e.g. `caote+h2o,tova`."""
    items = text.split(",")
    if any(not item for item in items):
        raise ValueError(f"{option}: empty policy in {text!r}; separate policies with single commas")
    return [parse_policy(item, option) for item in items]


def _known() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The manager's base policy and wrapper names (imported here: the CLI starts faster)."""
    from kvevict.cache_manager.policies import BASE_POLICIES
    from kvevict.cache_manager.wrappers import WRAPPERS

    return tuple(BASE_POLICIES), tuple(WRAPPERS)
