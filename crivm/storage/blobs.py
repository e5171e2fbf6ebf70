"""The content-addressed blob store: ``<root>/storage/blobs/<algorithm>/<hex>``.

A blob becomes visible only after its digest was checked: it is written to a temp file under
``<root>/storage/tmp`` while hashing, then renamed into place. A mismatch deletes the temp
file, so nothing of a bad blob is ever stored.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from crivm.errors import CrivmError
from crivm.storage.reference import validate_digest


class DigestMismatch(CrivmError):
    """Content did not hash to the digest that names it; it was thrown away."""

    code = "DATA_LOSS"


class BlobWriter:
    """A temp file that hashes what is written; ``commit()`` verifies and moves it into place."""

    def __init__(self, store: BlobStore, digest: str) -> None:
        self._store = store
        self.digest = validate_digest(digest)
        algorithm = digest.partition(":")[0]
        self._hash = hashlib.new(algorithm)
        fd, name = tempfile.mkstemp(prefix="blob-", dir=store.tmp_dir)
        self.temp_path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)

    def commit(self, source: str) -> Path:
        """Check the digest and publish the blob; on mismatch delete it and raise."""
        self._file.close()
        actual = f"{self.digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if actual != self.digest:
            self.temp_path.unlink(missing_ok=True)
            raise DigestMismatch(
                f"blob from {source} should be {self.digest} but hashes to {actual}; discarded"
            )
        final = self._store.path(self.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, final)
        return final

    def discard(self) -> None:
        self._file.close()
        self.temp_path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, digest: str) -> Path:
        algorithm, _, encoded = validate_digest(digest).partition(":")
        return self.root / algorithm / encoded

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self, digest)

    def put(self, digest: str, data: bytes, source: str) -> Path:
        """Store bytes already in memory (manifests, configs), verified like any other blob."""
        writer = self.writer(digest)
        try:
            writer.write(data)
        except BaseException:
            writer.discard()
            raise
        return writer.commit(source)

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
