"""Errors that mean "this input cannot be processed", as opposed to a bug.

The CLI turns an InputError into one line on stderr and exit code 2; an archive run records
it against the image and carries on with the others.
"""


class InputError(Exception):
    """A source image, model card or weights file that cannot be used, and why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
