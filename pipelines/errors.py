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


def underlying_reason(exc: BaseException) -> str:
    """What a library's error says, with the reason it only points to: rasterio's "Read failed.
    See previous exception for details." carries GDAL's own messages as its causes, the last
    the most precise ("ZIPDecode:Decoding error at scanline 0", "TIFFFillTile:Read error ...;
    got 19592 bytes, expected 582125" for a cut file). The user sees no previous exception."""
    message = str(exc)
    if "previous exception" not in message:
        return message
    reasons, seen, cause = [], set(), exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if str(cause).strip():
            reasons.append(str(cause).strip())
        cause = cause.__cause__ or cause.__context__
    return f"{message.split('.')[0]}: {reasons[-1]}" if reasons else message


def unreadable_window(path, box, exc: BaseException) -> InputError:
    """The error for a window of an image that its reader could not decode: which rows and
    columns, and the library's reason (a cut or corrupt file shows here, block by block)."""
    (row0, col0), (row1, col1) = box.start, box.stop
    return InputError(path, f"cannot read rows {row0}:{row1}, cols {col0}:{col1} ({underlying_reason(exc)})")
