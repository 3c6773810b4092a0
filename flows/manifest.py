"""What has been done: one small JSON record per finished image, keyed for idempotency.

An image's key hashes its URI, size and modification time (ETag for objects) with the model card's digest and the
settings that change the output, so a nightly run skips an image only when the very same
result is already there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipelines import storage
from pipelines.sources import source_identity


def image_identity(uri: str) -> str:
    """An image's URI as the manifest knows it: local paths made absolute."""
    return storage.absolute(str(uri).rstrip("/"))


def image_key(uri: str, card_digest: str, settings: dict) -> str:
    # mtime for local files, ETag for objects; a Zarr store (a folder) by its root metadata
    # document, so rewriting chunks without touching the metadata goes unnoticed.
    identity = source_identity(uri)
    payload = json.dumps({"image": identity, "model": card_digest, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def manifest_path(out_root: str | Path, key: str) -> str:
    return storage.join(out_root, ".manifest", f"{key}.json")


def is_done(out_root: str | Path, key: str) -> bool:
    return storage.exists(manifest_path(out_root, key))


def mark_done(out_root: str | Path, key: str, record: dict) -> None:
    """Written last, after every output is in place; the rename makes it all-or-nothing."""
    storage.write_whole(manifest_path(out_root, key), json.dumps(record, indent=2, default=str).encode())
