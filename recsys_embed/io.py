"""Atomic writes: a reader sees the old file/table or the new one, never a partial one.

Files are written to a temporary sibling and ``os.replace``d into place. Tables (folders of Parquet
parts) are staged in a hidden sibling folder, finished with a ``_SUCCESS`` marker, then swapped in.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from recsys_embed.errors import OutputError

SUCCESS_MARKER = "_SUCCESS"

# errno of a failed write -> (what happened, what to do); anything else is re-raised unchanged.
_SPACE_FIX = "free space there (or raise the quota / `ulimit -f`), or set output_root to a larger disk, then re-run"
_PERM_FIX = "make that folder writable for user {user}, or set output_root to a writable folder, then re-run"
_WRITE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: _SPACE_FIX,
    errno.EFBIG: _SPACE_FIX,  # a file size limit (ulimit -f) or a quota
    errno.EDQUOT: _SPACE_FIX,
    errno.EACCES: _PERM_FIX,
    errno.EPERM: _PERM_FIX,
    errno.EROFS: "set output_root to a writable file system, then re-run",
}
_OS_ERROR_CODE = re.compile(r"os error (\d+)")  # how Polars (Rust) reports an I/O error: no errno attribute


def _write_errno(e: BaseException) -> int | None:
    code = getattr(e, "errno", None)
    if isinstance(code, int):
        return code
    m = _OS_ERROR_CODE.search(str(e))
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def output_errors(path: str | Path, what: str = "output") -> Iterator[None]:
    """Turn a failed write (disk full, quota, permission denied, read-only) into one ``OutputError`` line.

    The message names ``path``, the file that failed when the OS says which, the cause, and the fix; other
    errors pass through unchanged. Writers in this module are atomic, so the previous output stays as it was.
    """
    try:
        yield
    except OutputError:
        raise
    except (OSError, pl.exceptions.PolarsError) as e:
        code = _write_errno(e)
        if code not in _WRITE_ERRNOS:
            raise
        assert code is not None
        culprit = getattr(e, "filename", None)
        at = f" (at '{culprit}')" if culprit and str(culprit) != str(path) else ""
        err = OutputError(
            f"cannot write {what} '{path}': {os.strerror(code)} [{errno.errorcode.get(code, code)}]{at}; "
            f"{_WRITE_ERRNOS[code].format(user=_user())}; the previous {what} (if any) is unchanged"
        )
        err.errno = code
        raise err from e


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def inside(root: str | Path, *parts: str | Path) -> Path:
    """``root / parts...``, refusing a result outside ``root`` (an absolute part, ``..``, an empty name).

    The check is lexical (symlinks under ``root`` may point anywhere: that is the operator's choice).

    Raises:
        OutputError: a part would leave ``root``; names the part and the fix.
    """
    base = os.path.normpath(os.fspath(root))
    for part in parts:
        text = os.fspath(part)
        if not text or "\x00" in text:
            raise OutputError(f"empty or NUL-holding path part {text!r} below '{root}'; use a plain relative name")
    joined = os.path.normpath(os.path.join(base, *(os.fspath(x) for x in parts)))
    rel = os.path.relpath(joined, base) if os.path.isabs(joined) == os.path.isabs(base) else ".."
    if rel == ".." or rel.startswith(".." + os.sep):
        shown = "/".join(os.fspath(p) for p in parts)
        raise OutputError(
            f"path {shown!r} leaves the output folder '{root}' (it would be '{joined}'); "
            "use a plain relative name without '..' or a leading '/'"
        )
    return Path(root).joinpath(*parts)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    with output_errors(target, "file"):
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with output_errors(target, "file"):
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet_atomic(frame: pl.DataFrame, target: str | Path) -> Path:
    with output_errors(target, "file"), atomic_path(target) as tmp:
        frame.write_parquet(tmp, compression="zstd", statistics=True)
    return Path(target)


def write_json_atomic(obj: Any, target: str | Path) -> Path:
    with output_errors(target, "file"), atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str), encoding="utf-8")
    return Path(target)


def write_text_atomic(text: str, target: str | Path) -> Path:
    with output_errors(target, "file"), atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


@contextlib.contextmanager
def staged_table(target: str | Path) -> Iterator[Path]:
    """Stage a table folder and swap it in as ``target`` on success.

    Write part files into the yielded folder. On exit a ``_SUCCESS`` marker is written, the old table
    (if any) is moved aside and the staged one renamed into place; the old one is then deleted. The
    window between the two renames is two metadata operations; readers should check ``_SUCCESS``.
    On error the staging folder is removed and the previous table stays intact.
    """
    target = Path(target)
    stage = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    with output_errors(target, "table"):
        target.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    try:
        yield stage
        with output_errors(target, "table"):
            (stage / SUCCESS_MARKER).write_text("", encoding="utf-8")
            _fsync_dir(stage)
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(target, old)
            try:
                os.replace(stage, target)
            except OSError:
                if old is not None:  # put the previous table back before reporting
                    os.replace(old, target)
                raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def is_complete_table(path: str | Path) -> bool:
    """True when ``path`` is a table folder committed by ``staged_table``."""
    p = Path(path)
    return p.is_dir() and (p / SUCCESS_MARKER).exists()


def read_table(path: str | Path) -> pl.DataFrame:
    """Read a committed table folder (all ``part-*.parquet``) or a single Parquet file."""
    p = Path(path)
    if p.is_dir():
        if not is_complete_table(p):
            raise FileNotFoundError(f"table '{p}' has no {SUCCESS_MARKER} marker: it was not committed")
        parts = sorted(p.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"table '{p}' holds no Parquet parts")
        return pl.concat([pl.read_parquet(x) for x in parts], how="vertical")
    return pl.read_parquet(p)
