"""Each image's folder in an output root: a name that no other image of the root has, that never
lands on what segpipe keeps in the root, and that stays the same from night to night.

An image is named after its file, without the format suffix (`T32UQD.tif` -> `T32UQD`). When
that name is taken by another image of the root (`a.tif` and `a.TIFF`, `2026-11-01/T32UQD.tif`
and `2026-11-02/T32UQD.tif`), is one of the root's own entries (`stats`, `runs`, ...) or is no
usable folder name (`.tif`, `..tif`, a hidden name), the image gets `<name>-<8 hex digits>`, the
digits from a hash of its URI (more digits in the unlikely case those are taken too). The
first image to ask keeps the plain name for good: every name is recorded in
`<root>/.names/<name in lower case>.json` with the URI that owns it (lower case: two names that
differ only in case would be one folder on a case-insensitive file system). A record is created
once, with a create-if-absent write, so two runs or two images of one run never share a name.
"""

from __future__ import annotations

import hashlib
import json

from flows.manifest import image_identity
from pipelines import storage

NAMES_FOLDER = ".names"
# What segpipe keeps in an output root besides the images' folders.
RESERVED = frozenset({"stats", "runs", ".manifest", ".work", NAMES_FOLDER, ".segpipe.lock"})
MAX_NAME_BYTES = 200
"""Longer names are cut: a folder name (the work folder adds a key to it) must stay below 255 bytes."""


def usable(name: str) -> bool:
    return bool(name) and not name.startswith(".") and name.lower() not in RESERVED and \
        len(name.encode()) <= MAX_NAME_BYTES and "/" not in name and "\\" not in name and name.strip() == name \
        and name.isprintable()


def candidate_names(stem: str, identity: str) -> list[str]:
    digest = hashlib.sha256(identity.encode()).hexdigest()
    base = "".join(c if c.isprintable() else "_" for c in stem.strip().lstrip(".")).replace("/", "_") \
        .replace("\\", "_") or "image"
    while len(base.encode()) > MAX_NAME_BYTES - 65:
        base = base[:-1]
    hashed = [f"{base}-{digest[:length]}" for length in (8, 16, 64)]
    return ([stem] if usable(stem) else []) + hashed


def claim_name(root: str, uri: str, stem: str) -> str:
    """The name of the image at `uri` in the output root `root` (claimed now if it has none)."""
    identity = image_identity(uri)
    for name in candidate_names(stem, identity):
        record = storage.join(root, NAMES_FOLDER, f"{name.lower()}.json")
        if storage.write_if_absent(record, json.dumps({"name": name, "uri": identity}).encode()):
            return name
        try:
            owner = json.loads(storage.read_bytes(record))
        except (ValueError, FileNotFoundError):
            continue  # a record torn by a crash: nobody can prove it theirs, so nobody takes it
        if owner.get("uri") == identity and owner.get("name") == name:
            return name
    raise RuntimeError(f"{uri}: every candidate output name is taken")  # 2^256 hashes: cannot happen
