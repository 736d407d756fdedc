"""Where an export writes: whole files or nothing, readable by a server, no stale temporaries.

An export (a merged checkpoint, a GGUF file) is written under a hidden temporary name beside its
target, `.NAME.tmp-PID…`, and renamed into place when complete. So:
    - the target is the old one or the new one, never a part of either;
    - Ctrl-C or SIGTERM mid-write removes the temporary on the way out (infer.py turns SIGTERM
      into an exception, so the `finally` blocks run);
    - SIGKILL cannot be caught: its temporary stays, and the next export to the same target
      removes it, knowing it is ours by its name and stale because its process is gone.
The directory of the target is created when missing, as `--output` and `--export` do. Files
get the permissions any new file would under the user's umask (0644 usually): `mkstemp` and
some writers create 0600 files, which a serving daemon running as another user cannot read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..adapter import current_umask
from ..errors import UserError


def check_output_path(path) -> Path:
    """An output file's path must be creatable: say so before the slow part. A missing
    directory is fine (it is created when the file is written) if its nearest existing
    ancestor is a writable directory."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name such as {path}/model.gguf")
    ancestor = path.parent if str(path.parent) else Path(".")
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise UserError(f"cannot write {path}: directory {ancestor} is not writable")
    return path


def temporary_prefix(target: Path) -> str:
    """`.NAME.tmp-PID`: the name says whose temporary it is, and whether its writer lives."""
    return f".{target.name}.tmp-{os.getpid()}"


def remove_stale_temporaries(target: Path) -> list[str]:
    """Remove temporaries of earlier exports to `target` whose process is gone; returns names."""
    removed = []
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        pid = p.name.removeprefix(f".{target.name}.tmp-").split("-")[0].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


def readable_as_usual(path: Path) -> None:
    """Give `path` (a file, or every file of a directory) the permissions of a new file."""
    mode = 0o666 & ~current_umask()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, mode)
