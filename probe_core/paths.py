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


# files whose presence means a directory already holds a model, an adapter or a checkpoint
CHECKPOINT_FILES = ("config.json", "adapter_config.json", "adapter_model.safetensors",
                    "model.safetensors", "optimizer.pt")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def destination_problem(path: str, protected: list[str] | None = None) -> str | None:
    """Why writing an adapter to the resolved `path` would destroy something (the message for
    the user), else None: it is an existing file, a directory that holds a model or adapter, or
    it equals, lies inside or contains one of the `protected` directories (the probed
    checkpoint's own)."""
    problem = None
    if os.path.exists(path) and not os.path.isdir(path):
        problem = "is an existing file"
    elif os.path.isdir(path) and any(os.path.exists(os.path.join(path, name))
                                     for name in CHECKPOINT_FILES):
        problem = "already holds a model or adapter that the probe would overwrite"
    elif any(_within(path, f) or _within(f, path)
             for f in (os.path.realpath(p) for p in protected or [])):
        problem = "is, lies inside or contains the probed checkpoint's directory"
    return f"save_updated_adapter_to {problem}; name a new directory" if problem else None


def check_destination(path: str, roots: list[str] | None, protected: list[str]) -> str:
    """The resolved save_updated_adapter_to, confined to the roots and refused (InvalidRequest)
    where writing it would overwrite a model, an adapter or the probed checkpoint."""
    resolved = confine(path, roots, what="save_updated_adapter_to", must_exist=False)
    problem = destination_problem(resolved, protected)
    if problem:
        raise InvalidRequest(problem)
    return resolved
