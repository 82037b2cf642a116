"""Atomic output: every folder we write appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless overwrite is set; refuse a path that is a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --out")
    check_writable_parent(out)


def check_writable_parent(out: Path) -> None:
    """Fail now, not after a long run: the nearest existing folder up the path must be one we can write into."""
    parent = Path(out).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write to {out}: {parent} is not a folder; choose a writable --out")
    try:  # a real try, not os.access: root passes permission checks but not a read-only or virtual file system
        os.rmdir(tempfile.mkdtemp(prefix=".sheafprune-probe-", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write to {out}: {parent} is not writable ({e.strerror}); choose a writable --out") from None


@contextlib.contextmanager
def atomic_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out`, on any error it is removed."""
    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an output folder is readable like any other
    except OSError as e:
        raise UserError(f"cannot write to {out.parent}: {e.strerror}; choose a writable --out") from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {out}: {e.strerror} (disk full or not writable?); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, *, what: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: {path} is not valid JSON ({e}); re-create it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what}: {path} must hold a JSON object")
    return obj
