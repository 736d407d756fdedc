"""One exception type for every mistake a user can make.

`train.py` and `infer.py` catch `UserError` and print its message, so a wrong path, a bad flag or
a broken data file ends in one clear sentence and a non-zero exit, never a traceback. They also
catch `OSError` (disk full, read-only, permission denied) and print it with `os_error_line`:
every file is written atomically, so such an error leaves nothing half-written. Anything else
that escapes is a bug in this project and keeps its traceback.
"""

import sys

# Installed by requirements.txt (import names): the packages a run cannot start without.
RUNTIME_PACKAGES = {"torch", "transformers", "safetensors", "tokenizers", "tqdm", "numpy",
                    "matplotlib", "yaml", "jinja2", "huggingface_hub"}  # fmt: skip


def missing_package_line(e: ModuleNotFoundError) -> str | None:
    """One line for a runtime package that is not installed (None for any other import error).

    The usual cause is running the system's python3 instead of the project's environment.
    """
    package = (e.name or "").split(".")[0]
    if package not in RUNTIME_PACKAGES:
        return None
    return (
        f"{package} is not installed in this Python ({sys.executable}): activate the project's "
        f"environment (source .venv/bin/activate), or run make train, which creates it; or "
        f"install the requirements here: pip install -r requirements.txt"
    )


def os_error_line(e: OSError) -> str:
    """An operating-system error as one line naming the path and the cause.

    Disk full, a read-only file system, a path under a file, a permission denied: these come from
    the machine, not from a bug, so the user gets the file and the reason instead of a traceback.
    """
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    cause = e.strerror or str(e)
    return f"{paths}: {cause}" if paths else cause


def with_path(e: OSError, path) -> OSError:
    """`e` with `path` as its filename: a failed `write()` (disk full) does not name its file."""
    return e if e.filename else OSError(e.errno, e.strerror or str(e), str(path))


class UserError(Exception):
    """A problem with the user's input (flags, files, model, data) that they can fix."""


class Terminated(BaseException):
    """SIGTERM as an exception, as Ctrl-C is KeyboardInterrupt: `finally` blocks then remove
    what an export was writing before the process exits (infer.py: status 143 = 128 + 15)."""


def raise_terminated(signum, frame):
    """A SIGTERM handler: `signal.signal(signal.SIGTERM, raise_terminated)`."""
    raise Terminated


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved because of Ctrl-C/SIGTERM; carries its path."""


def exit_status(e: Exception) -> int | None:
    """What train.py and infer.py do with an error a user can act on: print its one line and
    return the exit status (2: the user's input, 1: the machine or the environment). None for
    anything else, which is a bug and keeps its traceback."""
    if isinstance(e, UserError):
        line, status = str(e), 2
    elif isinstance(e, ModuleNotFoundError):
        line, status = missing_package_line(e), 1
    elif isinstance(e, OSError):  # disk full, read-only, a path under a file...
        line, status = os_error_line(e), 1
    else:
        line = None
    if line is None:
        return None
    print(f"error: {line}", file=sys.stderr)
    return status
