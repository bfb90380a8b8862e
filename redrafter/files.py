"""Writing a folder atomically, shared by the bundle writer and the checkpoint savers: a hidden
`.NAME.tmp-PID-*` sibling is written, then swapped into place (the previous copy briefly a
hidden `.NAME.old-PID-*` sibling); copies left by a killed writer are told from a live writer's
by the PID in their name."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (briefly process-wide), then restore
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def sibling_copies(out: Path) -> list[Path]:
    """The hidden siblings an interrupted writer of `out` may leave: `.NAME.tmp-PID-*` (a copy
    being written) and `.NAME.old-PID-*` (the previous copy, moved aside during a swap)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(
        p
        for p in out.parent.iterdir()
        if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")) and not p.is_symlink()
    )


def stale_copies(out: Path) -> list[Path]:
    """`sibling_copies` whose writer (the PID in the name) is dead: safe to remove."""
    stale = []
    for p in sibling_copies(out):
        rest = p.name[len(f".{out.name}.tmp-") :]  # same length for ".old-"
        pid, sep, _ = rest.partition("-")
        if sep and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            stale.append(p)
    return stale


def make_temp_dir(out: Path, kind: str = "tmp") -> Path:
    """A new hidden folder `.NAME.KIND-PID-RANDOM` beside `out`, with the mode the umask gives
    a new folder (mkdtemp's 0700 would hide the result from the user's group)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete folder `tmp` to `out`. An existing `out` is first renamed to a
    hidden `.NAME.old-PID-*` sibling, then removed: at every instant a complete copy (old or new)
    sits at `out` or at that sibling, where `recover_copy` finds it after a crash."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)  # put the previous copy back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
