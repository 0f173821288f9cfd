"""Path confinement: every checkpoint path must resolve (symlinks included) inside a root."""

from __future__ import annotations

import os

from probe_core.errors import CheckpointNotFound, InvalidRequest


def confine(path: str, roots: list[str] | None, *, what: str, must_exist: bool = True) -> str:
    """Resolve `path` and check it lies inside one of `roots` (None: no confinement).

    Returns the resolved absolute path. Raises InvalidRequest outside the roots and
    CheckpointNotFound when it must exist and does not. Messages never name paths outside
    the roots.
    """
    resolved = os.path.realpath(os.path.expanduser(path))
    if roots is not None:
        real_roots = [os.path.realpath(r) for r in roots]
        if not any(resolved == r or resolved.startswith(r.rstrip(os.sep) + os.sep)
                   for r in real_roots):
            raise InvalidRequest(f"{what} path {path!r} lies outside the server's checkpoint "
                                 "roots (ENTROPY_PROBE_CHECKPOINT_ROOTS)")
    if must_exist and not os.path.exists(resolved):
        raise CheckpointNotFound(f"{what} {path!r} does not exist")
    return resolved
