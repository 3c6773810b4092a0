import functools


@functools.cache  # asked for every output written: the package metadata is read once
def segpipe_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segpipe")
    except PackageNotFoundError:
        return "unknown"
