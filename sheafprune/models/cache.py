"""Where models we build or convert are cached, and how a cache folder appears: whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: `$SHEAFPRUNE_CACHE` if set, else `~/.cache/sheafprune` (not created here)."""
    env = os.environ.get("SHEAFPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sheafprune"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty scratch folder beside `final`; when the block succeeds, rename it to `final`.

    The rename is one atomic step, so readers see either no folder or a complete one, and a crash
    leaves only a hidden scratch folder. When two processes race, the first rename wins and the
    loser's (identical) copy is discarded. An exception in the block leaves `final` untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as `final`: a rename across file systems would not be atomic.
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(scratch, 0o755)  # mkdtemp makes it private; a cache folder is readable like any other
    try:
        yield scratch
        try:
            os.replace(scratch, final)
        except OSError:
            # POSIX refuses to replace a non-empty folder: another process finished first.
            if not final.is_dir():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
