"""Finding the file a job's argv[0] names, the way execvp would, before anything is created."""

from __future__ import annotations

import os
import shutil

from jobworker.errors import SpawnError


def resolve_command(argv0: str, path_var: str, cwd: str) -> str:
    """The file execve will run, resolved the way execvp would, or a :class:`SpawnError`."""
    if not os.path.isdir(cwd):
        raise SpawnError(f"working directory {cwd!r} does not exist or is not a directory")
    if "/" in argv0:
        candidate = argv0 if argv0.startswith("/") else os.path.join(cwd, argv0)
        if not os.path.exists(candidate):
            raise SpawnError(f"command not found: {argv0!r} (no such file)")
        if os.path.isdir(candidate) or not os.access(candidate, os.X_OK):
            raise SpawnError(f"cannot execute {argv0!r}: not an executable file")
        return candidate
    found = shutil.which(argv0, path=path_var)
    if found is None:
        raise SpawnError(f"command not found: {argv0!r} (searched PATH={path_var})")
    if not found.startswith("/"):
        found = os.path.join(cwd, found)
    return found
