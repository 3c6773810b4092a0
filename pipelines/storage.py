"""One way to address storage: local paths and `s3://bucket/key` URIs, through fsspec / s3fs.

Where an S3 endpoint and credentials come from (the names botocore itself reads, so s3fs, boto3
and GDAL see one configuration):

- `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`: a custom endpoint such as
  `http://127.0.0.1:9000` (MinIO, moto, Ceph); unset means AWS itself.
- `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (optionally `AWS_SESSION_TOKEN`), or whatever
  else the botocore credential chain finds (shared config file, instance role).
- `AWS_DEFAULT_REGION`, else `AWS_REGION`.

GDAL (and so rasterio) has its own names for the endpoint, documented under "/vsis3/" in
https://gdal.org/en/stable/user/virtual_file_systems.html; `rasterio_env` translates.

A local path is returned as given (a string), never rewritten to `file://`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import rasterio
from fsspec.core import url_to_fs
from rasterio.session import AWSSession

from pipelines.errors import InputError

LOCAL_PROTOCOLS = ("file", "local")


def is_remote(uri: str | Path) -> bool:
    """True for a URI with a scheme other than file:// (s3://, gs://, ...)."""
    scheme = urlsplit(str(uri)).scheme
    # One-letter "schemes" are Windows drive letters (C:\...), not protocols.
    return len(scheme) > 1 and scheme not in LOCAL_PROTOCOLS


def s3_endpoint_url() -> str | None:
    """The custom S3 endpoint from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None


def storage_options(uri: str | Path) -> dict:
    """fsspec storage options for `uri`: for s3, the endpoint and region from the environment.

    Credentials are left to botocore's own chain. Listings are not cached: discovery must see
    objects written since the last look, and an fsspec filesystem instance outlives a run.
    """
    if urlsplit(str(uri)).scheme != "s3":
        return {}
    options: dict = {"use_listings_cache": False}
    if endpoint := s3_endpoint_url():
        options["endpoint_url"] = endpoint
    if region := s3_region():
        options["client_kwargs"] = {"region_name": region}
    return options


def filesystem(uri: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path within it (bucket/key for s3)."""
    try:
        return url_to_fs(str(uri), **storage_options(uri))
    except (ImportError, ValueError) as exc:  # fsspec knows gs://, az://, ... but their packages are not installed
        if not is_remote(uri):
            raise
        scheme = urlsplit(str(uri)).scheme
        raise InputError(uri, f"{scheme}:// is not a storage segpipe reads (local paths, s3:// and https:// are); "
                              "Google Cloud Storage (with HMAC keys), MinIO and Ceph speak S3: s3://bucket/key with "
                              "AWS_ENDPOINT_URL set to their endpoint (https://storage.googleapis.com)") from exc


def exists(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def stat(uri: str | Path) -> tuple[int, str]:
    """(size in bytes, version tag) of one file or object.

    The tag changes when the content is rewritten: the modification time in nanoseconds for
    a local file, the ETag (without its quotes) for an S3 object. A manifest keys images by
    URI + size + tag.
    """
    uri = str(uri)
    if not is_remote(uri):
        local = _local_path(uri)
        try:
            status = local.stat()
        except FileNotFoundError as exc:
            raise InputError(uri, "no such file") from exc
        if not local.is_file():
            raise InputError(uri, "a folder, not a file")
        return status.st_size, str(status.st_mtime_ns)
    with _input_errors(uri):
        fs, path = filesystem(uri)
        info = fs.info(path)
    if info.get("type") != "file":
        raise InputError(uri, "a prefix (folder), not an object")
    tag = info.get("ETag") or info.get("etag") or info.get("mtime")
    if tag is None:
        raise InputError(uri, f"the {fs.protocol} filesystem reports neither ETag nor mtime")
    return int(info["size"]), str(tag).strip('"')


GLOB_CHARACTERS = ("*", "?", "[")


def has_glob_characters(text: str) -> bool:
    """Whether fsspec would take `text` as a glob pattern rather than a name."""
    return any(character in text for character in GLOB_CHARACTERS)


def list_images(uri_prefix: str | Path, suffixes: Iterable[str], folder_suffixes: Iterable[str] = (),
                hidden: bool = False) -> list[str]:
    """Files directly in a folder / under a prefix whose names end in one of `suffixes`
    (case-insensitive, e.g. (".tif", ".tiff")), and folders whose names end in one of
    `folder_suffixes` (stores such as ".zarr"), sorted. Not recursive. A glob pattern
    (`archive/2026-*/*.tif`, `s3://bucket/scenes/*_B04.tif`, `**` for any depth) lists the
    files it matches instead, whatever their suffix; a folder that exists under a name with
    glob characters (`scenes[1]`) is a folder.

    Remote entries come back as full URIs (s3://bucket/key); local ones as paths under the
    folder as it was given. Hidden names (a leading dot) are left out: macOS's AppleDouble
    companions (`._scene.tif`, not images) on shared drives and the temporary files of a copy
    in progress (rsync's `.scene.tif.Xy12`); `hidden=True` lists only those.
    """
    uri_prefix = str(uri_prefix)
    if has_glob_characters(uri_prefix) and not is_folder(uri_prefix):
        return [uri for uri in _glob_files(uri_prefix) if is_hidden(uri) == hidden]
    endings = {"file": tuple(s.lower() for s in suffixes), "directory": tuple(s.lower() for s in folder_suffixes)}
    if not is_remote(uri_prefix):
        folder = _local_path(uri_prefix)
        if not folder.is_dir():
            raise InputError(uri_prefix, "no such folder")
        return sorted(str(p) for p in folder.iterdir()
                      if p.name.lower().endswith(endings["file" if p.is_file() else "directory"])
                      and is_hidden(p.name) == hidden)
    with _input_errors(uri_prefix):
        fs, path = filesystem(uri_prefix)
        entries = fs.ls(path.rstrip("/"), detail=True)
    return sorted(
        fs.unstrip_protocol(entry["name"].rstrip("/"))
        for entry in entries
        if entry["name"].rstrip("/").lower().endswith(endings.get(entry["type"], ()))
        and is_hidden(entry["name"]) == hidden
    )


def is_hidden(path: str) -> bool:
    """A file or folder whose name starts with a dot."""
    return str(path).rstrip("/").rsplit("/", 1)[-1].startswith(".")


def is_folder(uri: str) -> bool:
    """A folder or prefix that exists by that very name: a path such as `scenes[1]` is taken as
    it is, not as a glob pattern."""
    if not is_remote(uri):
        return _local_path(uri).is_dir()
    fs, path = filesystem(uri)
    return fs.isdir(path.rstrip("/"))


def _glob_files(pattern: str) -> list[str]:
    with _input_errors(pattern):
        fs, path = filesystem(pattern)
        matches = fs.glob(path, detail=True)
    files = [name for name, entry in matches.items() if entry["type"] == "file"]
    if is_remote(pattern):
        return sorted(fs.unstrip_protocol(name) for name in files)
    return sorted(files)


def put_file(local_path: str | Path, uri: str | Path) -> None:
    """Copy one local file to `uri` (a local path or an object key).

    Missing local parent folders are created; a missing bucket is an InputError, never created
    here (s3fs's makedirs would create it, with whatever default policy the account has).
    """
    local_path = Path(local_path)
    if not local_path.is_file():
        raise InputError(local_path, "no such file to upload")
    with _input_errors(str(uri)):
        fs, path = filesystem(uri)
        if not is_remote(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        fs.put_file(str(local_path), path)


def get_file(uri: str | Path, local_path: str | Path) -> None:
    """Copy one file or object to a local path (its folder must exist)."""
    with _input_errors(str(uri)):
        fs, path = filesystem(uri)
        fs.get_file(path, str(local_path))


def put_tree(local_dir: str | Path, uri: str | Path) -> list[str]:
    """Copy every file under `local_dir` to the same relative key under `uri`; returns the
    destination URIs/paths, sorted.

    Used for a finished output folder (labels.tif, preview.png, a Zarr store directory). The
    layout under `uri` mirrors `local_dir` exactly whether or not `uri` already exists: the
    sources and destinations are given to fsspec as explicit lists, which also lets s3fs
    upload them concurrently. Empty folders are not copied (object stores have none; Zarr
    does not need them).
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise InputError(local_dir, "no such folder to upload")
    relative = list_files(local_dir)
    sources = [str(local_dir / name) for name in relative]
    with _input_errors(str(uri)):
        fs, root = filesystem(uri)
        root = root.rstrip("/")
        targets = [f"{root}/{name}" for name in relative]
        if not is_remote(uri):
            for parent in {Path(target).parent for target in targets}:
                parent.mkdir(parents=True, exist_ok=True)
        if sources:
            fs.put(sources, targets)
    base = str(uri).rstrip("/")
    return [f"{base}/{name}" for name in relative]


def publish_folder(staged: Path, target: str, previous: str) -> None:
    """Make a finished local folder the folder `target`, replacing what was there.

    Locally the new folder replaces the old in renames: a reader sees one or the other, whole
    (the old one passes through `previous`, on the same file system). On object storage, which
    has no rename, the new files are uploaded over the old, then the old ones the new folder
    lacks are removed."""
    if is_remote(target):
        put_tree(staged, target)
        kept = set(list_files(staged))
        for name in list_files(target):
            if name not in kept:
                remove(join(target, name))
        return
    output_dir, previous = _local_path(target), _local_path(previous)
    if output_dir.exists():
        output_dir.replace(previous)
    staged.replace(output_dir)
    shutil.rmtree(previous, ignore_errors=True)


def write_whole(uri: str | Path, data: bytes) -> None:
    """Write a whole file: locally through a hidden temporary name and a rename, on object
    storage in one PUT; either way no reader ever sees half a file, whenever the writer dies."""
    if is_remote(uri):
        fs, key = filesystem(uri)
        fs.pipe_file(key, data)
        return
    target = _local_path(str(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    partial.replace(target)


def absolute(uri: str | Path) -> str:
    """A local path made absolute (what a report or record read from elsewhere can follow); a
    URI as it is."""
    return str(uri) if is_remote(uri) else str(Path(uri).resolve())


def join(base: str | Path, *parts: str) -> str:
    """`base` with `parts` appended: a local path, or a URI with '/' separators."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def read_bytes(uri: str | Path) -> bytes:
    if not is_remote(uri):
        return _local_path(str(uri)).read_bytes()
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_if_absent(uri: str | Path, data: bytes) -> bool:
    """Create a file that must not exist yet; False (nothing written) when it already does. On
    S3 this is one conditional PUT (If-None-Match: *), so two writers never both succeed."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    target = _local_path(str(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def list_names(uri: str | Path) -> list[str]:
    """The names of the entries directly inside a folder or under a prefix ([] if there are none)."""
    if not is_remote(uri):
        folder = _local_path(str(uri))
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fs, path = filesystem(uri)
    try:
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path.rstrip("/"), detail=False))
    except FileNotFoundError:
        return []


def subfolders(uri: str | Path) -> list[str]:
    """The names of the folders (prefixes) directly inside a folder or prefix, sorted, but not
    stores read as images (.zarr)."""
    if not is_remote(uri):
        folder = _local_path(str(uri))
        names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    else:
        fs, path = filesystem(uri)
        try:
            names = [entry["name"].rstrip("/").rsplit("/", 1)[-1]
                     for entry in fs.ls(path.rstrip("/"), detail=True) if entry["type"] == "directory"]
        except FileNotFoundError:
            names = []
    return sorted(name for name in names if not name.lower().endswith(".zarr"))


def list_files(uri: str | Path) -> list[str]:
    """Every file under a folder or prefix, as paths relative to it ('/'-separated), sorted."""
    if not is_remote(uri):
        folder = _local_path(str(uri))
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    fs, path = filesystem(uri)
    root = path.rstrip("/")
    return sorted(name[len(root) + 1:] for name in fs.find(root))


def remove(uri: str | Path) -> None:
    """Remove one file or object if it is there."""
    if not is_remote(uri):
        _local_path(str(uri)).unlink(missing_ok=True)
        return
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_files(uris: list[str]) -> None:
    """Remove files or objects, those that are there (all in one bucket): on object storage in
    requests of up to a thousand keys instead of one request per object."""
    remote = [uri for uri in uris if is_remote(uri)]
    for uri in uris:
        if not is_remote(uri):
            remove(uri)
    if not remote:
        return
    fs, _ = filesystem(remote[0])
    keys = [filesystem(uri)[1] for uri in remote]
    for uri, key in zip(remote, keys):
        if has_glob_characters(key):  # fs.rm would take such a name as a glob pattern
            remove(uri)
    plain = [key for key in keys if not has_glob_characters(key)]
    if plain:
        fs.rm(plain)


def remove_tree(uri: str | Path) -> None:
    """Remove a folder or everything under a prefix, if there is anything."""
    if not is_remote(uri):
        shutil.rmtree(_local_path(str(uri)), ignore_errors=True)
        return
    fs, path = filesystem(uri)
    found = fs.find(path.rstrip("/"))
    if has_glob_characters(path):
        for name in found:  # fs.rm would take the name as a glob pattern
            fs.rm_file(name)
    elif found:
        fs.rm(path.rstrip("/"), recursive=True)


def gdal_path(uri: str | Path) -> str:
    """The GDAL virtual-filesystem path for `uri`: s3://bucket/key -> /vsis3/bucket/key.

    rasterio.open does this itself for s3:// URIs; GDAL tools and VRTs need it spelled out.
    """
    uri = str(uri)
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return f"/vsis3/{parts.netloc}{parts.path}"
    if is_remote(uri):
        raise InputError(uri, f"no GDAL virtual filesystem is configured for {parts.scheme}://")
    return str(_local_path(uri))


@contextlib.contextmanager
def rasterio_env(uri: str | Path) -> Iterator[rasterio.Env]:
    """A rasterio.Env in which `rasterio.open(uri)` works, for local paths and s3:// URIs.

    For s3 the credentials come from the same botocore chain s3fs uses (via rasterio's
    AWSSession); a custom endpoint becomes GDAL's AWS_S3_ENDPOINT (host[:port], no scheme),
    AWS_HTTPS=NO for an http:// endpoint, and path-style addressing (AWS_VIRTUAL_HOSTING=FALSE)
    because a local or on-premise server has no per-bucket DNS names.
    """
    if urlsplit(str(uri)).scheme != "s3":
        with rasterio.Env() as env:
            yield env
        return
    options: dict = {}
    endpoint = s3_endpoint_url()
    host = None
    if endpoint:
        parts = urlsplit(endpoint)
        host = parts.netloc + parts.path.rstrip("/")
        options["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
        options["AWS_VIRTUAL_HOSTING"] = "FALSE"
    session = AWSSession(region_name=s3_region(), endpoint_url=host)
    with rasterio.Env(session=session, **options) as env:
        yield env


def _local_path(uri: str) -> Path:
    """A local path from a plain path or a file:// URI."""
    parts = urlsplit(uri)
    return Path(parts.path) if parts.scheme in LOCAL_PROTOCOLS else Path(uri)


@contextlib.contextmanager
def _input_errors(uri: str) -> Iterator[None]:
    """Missing or forbidden objects and buckets are bad input; anything else (an endpoint that
    does not answer, a malformed reply) is left to propagate as the failure it is."""
    try:
        yield
    except FileNotFoundError as exc:
        raise InputError(uri, f"no such object or bucket ({exc})") from exc
    except PermissionError as exc:
        raise InputError(uri, f"access denied ({exc})") from exc
