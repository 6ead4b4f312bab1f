"""The one exception type the CLI turns into a one-line message and exit code 2, and the line for OS errors."""

from __future__ import annotations

import errno


class QuantoolError(Exception):
    """A problem with the user's input or environment, phrased as problem + fix."""


_FIXES = {
    errno.EROFS: "the filesystem is read-only: choose a writable location (-o)",
    errno.EACCES: "permission denied: choose a location you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a location you can write, or fix its permissions",
    errno.ENOSPC: "the disk is full: free space there, then rerun (with --resume where the command has it)",
    errno.EDQUOT: "the disk quota is exceeded: free space there, then rerun (with --resume where the command has it)",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: choose another path",
}


def os_error_line(exc: OSError) -> str:
    """One line naming the path, what went wrong and the fix; work already done stays where it was."""
    where = f"{exc.filename}: " if exc.filename else ""
    fix = _FIXES.get(exc.errno or 0)
    return f"{where}{fix}" if fix else f"{where}{exc.strerror or exc}"
