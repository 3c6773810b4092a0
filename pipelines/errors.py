"""Errors that mean "this input cannot be processed", as opposed to a bug.

The CLI turns an InputError into one line on stderr and exit code 2; an archive run records
it against the image and carries on with the others.
"""


class InputError(Exception):
    """A source image, model card or weights file that cannot be used, and why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{printable(self.path)}: {' '.join(str(reason).split())}")

    def __reduce__(self):
        # Rebuilt from (path, reason), so it crosses process boundaries (Ray workers) intact.
        return type(self), (self.path, self.reason)


def printable(text: str) -> str:
    """`text` on one line: control characters (a newline in a file name) written as escapes."""
    return "".join(repr(c)[1:-1] if not c.isprintable() and c != " " else c for c in text)
