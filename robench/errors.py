"""One exception type for every user-facing problem, carrying the fix as well as the fault."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RobenchError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback and exits 2."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


def closest_first(name: str, valid: Iterable[str]) -> list[str]:
    """Valid names ordered by similarity to ``name`` (closest first), then alphabetically."""
    valid = sorted(set(valid))
    if not valid:  # difflib refuses n=0
        return []
    close = difflib.get_close_matches(name, valid, n=len(valid), cutoff=0.0)
    return close or valid


def unknown(kind: str, name: str, valid: Iterable[str], fix: str | None = None,
            limit: int | None = None) -> RobenchError:
    """Error for an unknown name that lists the valid ones, the closest match first (only the
    ``limit`` closest when there are many, e.g. open_clip's ~150 architectures)."""
    ordered = closest_first(str(name), valid)
    hint = f" Did you mean '{ordered[0]}'?" if ordered else ""
    if not ordered:
        listing = "(none registered)"
    elif limit is not None and len(ordered) > limit:
        listing = f"{', '.join(ordered[:limit])}, ... ({len(ordered)} in all)"
    else:
        listing = ", ".join(ordered)
    what = f"Closest of the {kind}s" if limit is not None and len(ordered) > limit else \
        f"Valid {kind}s"
    return RobenchError(
        f"unknown {kind} '{name}'.{hint} {what}: {listing}",
        fix or f"use one of the valid {kind}s, or register a new one",
    )
