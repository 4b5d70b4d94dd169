"""Prints the runtime requirements of pyproject.toml, one per line, for the Dockerfiles.

    python requirements.py                                # all of [project].dependencies
    python requirements.py --only torch                   # torch's pinned requirement
    python requirements.py --without torch transformers   # the cache manager's (it never imports them)

Installing the requirements in a layer of their own, before the source is copied, keeps pip's
work cached while only the source changes; pyproject.toml stays the one list of versions.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement (`grpcio-health-checking==1.2` -> `grpcio-health-checking`)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, only: list[str] | None = None, without: list[str] | None = None) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    known = {name(r) for r in dependencies}
    asked = {name(n) for n in (only or []) + (without or [])}
    if asked - known:
        raise ValueError(f"not a dependency in {pyproject}: {', '.join(sorted(asked - known))}")
    if only:
        wanted = {name(n) for n in only}
        return [r for r in dependencies if name(r) in wanted]
    unwanted = {name(n) for n in without or []}
    return [r for r in dependencies if name(r) not in unwanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print pyproject.toml's runtime requirements.")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", nargs="+", metavar="NAME", help="just these projects")
    group.add_argument("--without", nargs="+", metavar="NAME", help="all but these projects")
    args = parser.parse_args(argv)
    try:
        print("\n".join(requirements(args.pyproject, args.only, args.without)))
    except ValueError as error:
        print(f"requirements.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
