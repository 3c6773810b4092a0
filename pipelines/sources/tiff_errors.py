"""What tifffile raises for a TIFF that cannot be read, as opposed to a bug."""

from __future__ import annotations

import zlib

import tifffile

# tifffile raises anything from ValueError to IndexError on a damaged directory, and its
# decoders their own errors on a damaged strip or tile: zlib.error where it decodes with
# Python's zlib, and where imagecodecs is installed (tiffslide brings it) one RuntimeError
# subclass per codec of that module (DeflateError, JpegError, LzwError, ...), loaded lazily,
# so they are recognised by their module rather than listed.
TIFF_READ_ERRORS = (tifffile.TiffFileError, OSError, EOFError, ValueError, KeyError, IndexError, zlib.error)


def is_tiff_read_error(exc: BaseException) -> bool:
    return isinstance(exc, TIFF_READ_ERRORS) or (
        isinstance(exc, RuntimeError) and type(exc).__module__.partition(".")[0] == "imagecodecs")
