"""Who may write where: one rule for every stage's outputs, sidecars, work folders and locks.

Our users point these commands at folders that hold weeks of their work, so the rule is narrow
and the same everywhere:

- a stage may **create** a path that does not exist;
- it may **resume or skip** an output that it wrote itself: a folder whose `micota.json`, or a
  file whose `<file>.meta.json`, names the stage (and, for a skip, the same identity);
- with `--force` it may **replace** only an output of its own kind that it wrote itself, or an
  empty folder. `--force` never widens what counts as ours.

Anything else is refused before any work, with one line naming the path and why, whatever the
flags: a foreign file or non-empty folder, a symbolic link, `/`, the home folder, the current
folder or a folder above them, and anything that is, holds, or lies inside an input.

Sidecars (`OUT.correct.jsonl`, `OUT.stats.json`) are ours only beside an output that is ours;
work folders (`OUT.sweep/`, `OUT.work/`, response caches) and staging folders carry a marker
file of their own. Every output is written under an exclusive lock (`.NAME.lock` beside it):
a second process is refused at once, a lock left by a killed process is taken over (the OS
drops a dead process's flock), and a clean exit removes the lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Union

from micota_merge.core.errors import UserError
from micota_merge.core.identity import digest as identity_of  # noqa: F401  (what a manifest records as `identity`)

MANIFEST = "micota.json"
WORK_MARKER = ".micota-work.json"
STAGING_MARKER = ".micota-staging.json"
LOCK_FORMAT = "micota-merge lock"

PathLike = Union[str, os.PathLike]
Inputs = Union[Mapping[str, PathLike], Iterable[PathLike], None]

# What every --force help says: the rule above, in one sentence.
OWN = (
    " --force never widens what is replaced: a foreign file or folder, an input, the home or current folder "
    "is refused with or without it."
)


# ---------------------------------------------------------------- names


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,127}")


def plain_name(value: str, field: str) -> str:
    """A name that becomes one path component (a baseline, a point tag, a data set): no separator,
    no `..`, nothing a shell or a file system reads specially, so no path built from it can leave
    its work folder."""
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or set(value) <= {"."}:
        raise UserError(
            f"{field} {value!r}: use a plain name of letters, digits and _ . + = @ - "
            "(no '/', no '..', at most 128 characters)"
        )
    return value


def inside(child: Path, folder: Path) -> bool:
    """Whether `child` is `folder` or lies under it (both resolved)."""
    try:
        child.relative_to(folder)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- protected paths


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(p)))))


def _input_items(inputs: Inputs) -> list[tuple[str, Path]]:
    if inputs is None:
        return []
    items = inputs.items() if isinstance(inputs, Mapping) else ((str(p), p) for p in inputs)
    return [(str(label), Path(p)) for label, p in items if p is not None and str(p) != ""]


def protected_reason(path: PathLike, inputs: Inputs = None) -> Optional[str]:
    """Why `path` may never be written by a stage, or None."""
    real = _real(path)
    if real == Path(real.anchor):
        return "it is the root folder"
    home = _real(Path.home())
    for folder, what in ((home, "your home folder"), (_real(Path.cwd()), "the current folder")):
        if real == folder:
            return f"it is {what}"
        if inside(folder, real):
            return f"it holds {what}"
    for label, p in _input_items(inputs):
        if not os.path.lexists(p):
            continue
        inp = _real(p)
        same = real == inp
        if not same and real.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(real, inp)
        named = label if label == str(p) else f"{label} ({p})"
        if same:
            return f"it is the input {named}"
        if inside(inp, real):
            return f"it holds the input {named}"
        if inp.is_dir() and inside(real, inp):
            return f"it lies inside the input {named}"
    return None


# ---------------------------------------------------------------- ownership evidence


def file_manifest(path: PathLike) -> Path:
    """The manifest of a file output: OUT.jsonl -> OUT.jsonl.meta.json."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def _read_json(p: Path) -> Optional[dict]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owner_stage(path: PathLike) -> Optional[str]:
    """The stage that wrote `path` by its own record, or None (absent, foreign, unreadable)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        m = _read_json(path / MANIFEST)
    elif path.is_file():
        m = _read_json(file_manifest(path))
        return _stage_of(m) if m else None
    else:
        return None
    stage = (m or {}).get("stage")
    return stage if isinstance(stage, str) else None


def _stage_of(file_meta: dict) -> Optional[str]:
    # generate's manifests from before the ownership rule carry its settings but no stage name
    return file_meta.get("stage") or ("generate" if {"format", "settings"} <= set(file_meta) else None)


@dataclass
class Claim:
    """What a stage found at its output path before writing. `state` is `new` (nothing there),
    `empty` (an empty folder) or `ours` (written by this stage; `manifest` is its record)."""

    path: Path
    stage: str
    state: str
    manifest: Optional[dict] = None

    def identity(self) -> Optional[str]:
        return (self.manifest or {}).get("identity")

    def same(self, identity: Optional[str]) -> bool:
        """Whether the output is ours, finished, and made from the same inputs and options."""
        return self.state == "ours" and identity is not None and self.identity() == identity


# Files our own later reads add to an output (content digests cached beside a checkpoint).
_CACHES = {".micota-fingerprint.json"}


def inventory(folder: PathLike) -> list[str]:
    """Every file under `folder`, relative: what a stage wrote, recorded in its manifest at commit."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def foreign_files(folder: PathLike) -> list[str]:
    """Files in an output of ours that its manifest does not list: someone else put them there.
    An output from before manifests listed their files cannot tell, and is taken whole."""
    folder = Path(folder)
    written = (_read_json(folder / MANIFEST) or {}).get("written_files")
    if not isinstance(written, list):
        return []
    known = set(written) | {MANIFEST}
    return [f for f in inventory(folder) if f not in known and Path(f).name not in _CACHES]


def check_replaceable(path: PathLike, option: str = "output") -> None:
    """Before an output of ours is replaced or removed: nothing in it may be someone else's."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        extra = foreign_files(path)
        if extra:
            shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            raise refuse(
                path, f"holds files micota-merge did not write ({shown}); move them out first, then run again", option
            )


def record_inventory(folder: PathLike) -> None:
    """Add the list of written files to a finished output's manifest (the commit step)."""
    folder = Path(folder)
    m = _read_json(folder / MANIFEST)
    if m is None:
        return
    from micota_merge.core.artifacts import write_json_atomic

    m["written_files"] = [f for f in inventory(folder) if f != MANIFEST]
    write_json_atomic(folder / MANIFEST, m)


def refuse(path: PathLike, why: str, option: str = "output") -> UserError:
    return UserError(f"{option} {path}: {why}; nothing was changed")


def claim(
    path: PathLike,
    stage: str,
    *,
    kind: str = "dir",
    inputs: Inputs = None,
    option: str = "output",
    stages: Iterable[str] = (),
) -> Claim:
    """Check `path` as an output of `stage` (a folder, or with kind="file" a file) before any work.

    `stages` names other stages whose outputs this one may also take as its own (e.g. `sweep`
    writes a TA that `build` wrote). Raises UserError for everything the rule refuses."""
    path = Path(path)
    if path.is_symlink():
        raise refuse(path, f"is a symbolic link (to {os.readlink(path)}); give the real path")
    why = protected_reason(path, inputs)
    if why:
        raise refuse(path, f"refused because {why}", option)
    ok = {stage, *stages}
    if kind == "dir":
        if path.exists() and not path.is_dir():
            raise refuse(path, "is a file, not a folder; give a folder path", option)
        if path.is_dir():
            manifest = _read_json(path / MANIFEST)
            if manifest and manifest.get("stage") in ok:
                return Claim(path, stage, "ours", manifest)
            if not any(path.iterdir()):
                return Claim(path, stage, "empty")
            found = (
                f"written by micota-merge {manifest['stage']}"
                if manifest and manifest.get("stage")
                else "not written by micota-merge (no micota.json)"
            )
            raise refuse(path, f"exists and is {found}, not by {stage}; choose another path", option)
    else:
        if path.is_dir():
            raise refuse(path, "is a folder; give a file name", option)
        if path.exists():
            manifest = _read_json(file_manifest(path))
            if manifest and _stage_of(manifest) in ok:
                return Claim(path, stage, "ours", manifest)
            raise refuse(
                path,
                f"exists and was not written by micota-merge {stage} (no {file_manifest(path).name} "
                f"naming it); choose another file name",
                option,
            )
        if file_manifest(path).exists():
            m = _read_json(file_manifest(path))
            if not (m and _stage_of(m) in ok):
                raise refuse(file_manifest(path), "exists and was not written by micota-merge; move it away", option)
    check_writable_location(path, option)
    return Claim(path, stage, "new")


def claim_sidecars(owner: Claim, sidecars: Iterable[PathLike], option: str = "output") -> None:
    """Files written beside an output are ours only when the output is ours: next to a new output,
    any that exists belongs to someone else and is refused, never overwritten."""
    if owner.state == "ours":
        return
    for p in sidecars:
        p = Path(p)
        if os.path.lexists(p):
            raise refuse(
                p,
                f"exists beside {owner.path}, which micota-merge has not written; move it away or "
                "choose another output name",
                option,
            )


def claim_workdir(
    path: PathLike,
    stage: str,
    owner: PathLike,
    inputs: Inputs = None,
    option: str = "output",
    adopt: Iterable[str] = (),
    create: bool = True,
) -> bool:
    """A work folder beside an output (`OUT.sweep/`, `OUT.work/`, a response cache): ours when it
    carries our marker, new when absent. Foreign content is refused. `adopt` names the only files a
    folder from before the marker existed may hold to be taken as ours. Returns whether it existed."""
    path = Path(path)
    why = protected_reason(path, inputs)
    if why:
        raise refuse(path, f"refused as {owner}'s work folder because {why}", option)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise refuse(path, f"is in the way of {owner}'s work folder (a file or link); move it away", option)
    if path.is_dir():
        marker = _read_json(path / WORK_MARKER)
        if marker and marker.get("stage") == stage:
            return True
        entries = {p.name for p in path.iterdir()}
        if entries and not (adopt and entries <= set(adopt)):
            raise refuse(
                path,
                f"exists and was not made by micota-merge {stage} as {owner}'s work folder; "
                "move it away or choose another output",
                option,
            )
    if not create:  # checked only: made when the first file goes in
        return path.is_dir()
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    from micota_merge.core.artifacts import write_json_atomic

    write_json_atomic(path / WORK_MARKER, {"stage": stage, "for": str(owner)})
    return existed


def is_workdir(path: PathLike, stage: str) -> bool:
    marker = _read_json(Path(path) / WORK_MARKER)
    return bool(marker) and marker.get("stage") == stage


def remove_ours(path: PathLike, stage: str) -> None:
    """Remove an output or work folder only if our own record says it is ours."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        if (
            owner_stage(path) == stage
            or is_workdir(path, stage)
            or (path / STAGING_MARKER).is_file()
            or not any(path.iterdir())
        ):
            check_replaceable(path)
            shutil.rmtree(path)
            return
    elif path.is_file() and owner_stage(path) == stage:
        path.unlink()
        file_manifest(path).unlink(missing_ok=True)
        return
    raise refuse(path, f"was about to be removed but is not micota-merge {stage}'s; left as it is")


def check_writable_location(path: PathLike, option: str) -> None:
    """Refuse, before any work, an output that could never be written: under a file, or in a
    folder this user cannot write (read-only mount, permissions)."""
    import tempfile

    path = Path(path)
    parent = path.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is a file, so nothing can be created under it; choose another path")
    try:  # os.access says yes to root on a read-only mount; only a real write tells
        fd, probe = tempfile.mkstemp(prefix=".micota-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"{option} {path}: cannot write in {parent} ({e.strerror or e}); choose a writable location"
        ) from None


def check_free_space(path: PathLike, needed: int, what: str, hint: str = "") -> None:
    """Refuse before the work when the disk that will hold `path` has less than `needed` bytes free."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(
            f"not enough disk space for {what}: about {needed / 2**30:.2f} GiB needed and {probe} has "
            f"{free / 2**30:.2f} GiB free{'; ' + hint if hint else ''}"
        )


# ---------------------------------------------------------------- locks


_HELD: dict[Path, int] = {}  # lock files this process holds, with their depth (nested stages)


def lock_path(path: PathLike) -> Path:
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.lock"


def _lock_owner(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("format") == LOCK_FORMAT else None


@contextlib.contextmanager
def output_lock(path: PathLike, stage: str, log=None) -> Iterator[Path]:
    """Hold an exclusive lock on `path` (an output or a pipeline work folder) for the block.

    flock is dropped by the OS when a process dies, so a lock file left by a killed run is simply
    taken over; the file is removed on a clean exit. Re-entrant within one process."""
    lp = lock_path(path)
    if lp in _HELD:
        _HELD[lp] += 1
        try:
            yield lp
        finally:
            _HELD[lp] -= 1
        return
    check_writable_location(path, "output")  # under a file, or unwritable: one line, not a mkdir traceback
    made = [p for p in [lp.parent, *lp.parent.parents] if not p.exists()]  # deepest first
    lp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(lp, path, stage, log):
            yield lp
    finally:
        for d in made:  # folders made only for the lock, and left empty by a refused or failed run
            try:
                os.rmdir(d)
            except OSError:
                break


@contextlib.contextmanager
def _locked(lp: Path, path: PathLike, stage: str, log) -> Iterator[None]:
    while True:
        if lp.is_symlink():
            raise refuse(lp, "is a symbolic link where micota-merge keeps its lock; move it away")
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = {}
            with contextlib.suppress(OSError):
                owner = _lock_owner(fd) or {}
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = owner.get("pid", "?")
            raise UserError(
                f"another micota-merge process (pid {pid}) is writing {path}; wait for it to finish, "
                "or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one
    try:
        old = _lock_owner(fd)
        if old is None:
            raise refuse(lp, "exists and is not a micota-merge lock; move it away")
        if old.get("pid") and log is not None:
            log(f"note: took over the lock on {path} left by pid {old['pid']} (no longer running)")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(
            fd,
            json.dumps(
                {"format": LOCK_FORMAT, "pid": os.getpid(), "stage": stage, "host": socket.gethostname()}
            ).encode(),
        )
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _HELD[lp] = 1
    try:
        yield
    finally:
        del _HELD[lp]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lp)
        os.close(fd)


def distributed_rank() -> int:
    """The global rank under torchrun / accelerate launch: only rank 0 claims and locks."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
