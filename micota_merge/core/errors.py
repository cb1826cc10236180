"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (recipe, path, option): shown without a traceback, exit code 2.

    Say what is wrong, name the field or file, and what to do about it.
    """

    exit_code = 2


class StageFailed(Exception):
    """A stage ran and produced something unusable (e.g. NaN weights): exit code 1."""

    exit_code = 1


# What a full disk looks like where it is not an OSError: safetensors ("os error 28"), sqlite (lm-eval's
# response cache), and torch.save, whose C++ writer loses the cause ("unexpected pos", "iostream error").
_FULL = ("no space left on device", "os error 28", "database or disk is full", "disk quota exceeded")
_WRITE_FAILED = ("iostream error", "unexpected pos", "file write failed", "pytorchstreamwriter failed")
# After a write that ran out of space the disk is (nearly) full; with more free than this, a vague
# write error is something else and keeps its traceback.
_NEARLY_FULL = 64 << 20


def free_mib(path) -> int:
    """Free space on the disk holding `path` (or its nearest existing parent), in MiB."""
    import shutil
    from pathlib import Path

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free >> 20


def disk_full(exc: BaseException, path) -> bool:
    """Whether `exc`, or an exception it was raised from, is a write that ran out of space on `path`'s disk."""
    import errno

    vague, seen, e = False, set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if any(s in text for s in _FULL):
            return True
        vague = vague or any(s in text for s in _WRITE_FAILED)
        e = e.__cause__ or e.__context__
    return vague and free_mib(path) << 20 < _NEARLY_FULL
