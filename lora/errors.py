"""One exception type for every mistake a user can make.

`train.py` and `infer.py` catch `UserError` and print its message, so a wrong path, a bad flag or
a broken data file ends in one clear sentence and a non-zero exit, never a traceback. Anything
else that escapes is a bug in this project and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (flags, files, model, data) that they can fix."""


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved because of Ctrl-C/SIGTERM; carries its path."""
