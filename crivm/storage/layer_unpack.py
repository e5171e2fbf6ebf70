"""Unpack one layer's tar stream into a directory, safely, in overlayfs form, as it downloads.

A layer comes from the network, so every path in it is hostile until checked. Nothing here
follows a symlink: each parent directory is opened one component at a time with
``O_NOFOLLOW | O_DIRECTORY`` relative to its own parent's descriptor, and every object is made
with the ``*at`` calls relative to that descriptor. An entry that is absolute, holds ``..``, or
whose parent is a symlink is rejected, and so is a hard link whose target is. ``tarfile`` only
parses the headers; ``extractall`` is never used.

Whiteouts become what overlayfs reads: ``.wh.NAME`` a 0/0 character device called NAME, and
``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr on its directory.

Runs in a worker thread: it is all blocking file I/O. The caller owns ``dest`` and removes it
whatever this raises; nothing here is trusted until both digests matched.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crivm.errors import CrivmError, PermissionDenied
from crivm.storage.blobs import DigestMismatch
from crivm.storage.layer_stream import BLOCK, CorruptLayer, LayerDecoder, TarStreamReader

log = logging.getLogger(__name__)

__all__ = ["CorruptLayer", "UnpackResult", "UnsafeLayer", "split_entry_name", "unpack_stream"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeLayer(PermissionDenied):
    """A layer entry tried to reach outside the layer root. The whole layer is refused."""


@dataclass(frozen=True)
class UnpackResult:
    diff_id: str  # sha256 of the uncompressed tar stream
    size: int  # bytes of the uncompressed tar stream


def unpack_stream(
    next_chunk: Callable[[], bytes], dest: Path, blob_digest: str, source: str,
    *, check: Callable[[], None] = lambda: None, progress: Callable[[int], None] | None = None,
) -> UnpackResult:
    """Unpack the (possibly compressed) layer whose bytes ``next_chunk`` returns (b"" at the
    end) into the existing empty directory ``dest``, checking that they hash to
    ``blob_digest``. The diff_id is the caller's to check.

    A layer that fails to unpack is read to its end all the same: when its bytes are not the
    blob ``blob_digest`` names, the damaged download is the error to report, not its effect.
    """
    decoder = LayerDecoder(next_chunk, blob_digest.partition(":")[0], check, progress)
    try:
        _extract(TarStreamReader(decoder.blocks()), dest, blob_digest)
    except CrivmError as exc:
        decoder.drain()
        if (mismatch := _mismatch(decoder, blob_digest, source)) is not None:
            raise mismatch from exc
        raise
    if (mismatch := _mismatch(decoder, blob_digest, source)) is not None:
        raise mismatch
    return UnpackResult(diff_id=decoder.diff_id, size=decoder.size)


def _extract(reader: TarStreamReader, dest: Path, what: str) -> None:
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        extractor = _Extractor(root_fd)
        try:
            # Not "r|": tarfile's stream mode copies its buffer on every read. The reader
            # seeks forward only, which is all tarfile does when members are read in order.
            with tarfile.open(fileobj=reader, mode="r:") as archive:  # type: ignore[call-overload]
                for member in archive:
                    extractor.add(member, archive)
            reader.drain()
        except tarfile.TarError as exc:
            raise CorruptLayer(f"layer {what} is not a valid tar stream: {exc}") from exc
        extractor.finish()
    finally:
        os.close(root_fd)


def _mismatch(decoder: LayerDecoder, blob_digest: str, source: str) -> DigestMismatch | None:
    if decoder.blob_digest == blob_digest:
        return None
    return DigestMismatch(f"blob from {source} should be {blob_digest} but hashes to "
                          f"{decoder.blob_digest}; discarded")


def split_entry_name(name: str) -> list[str]:
    """The components of a tar entry name, or UnsafeLayer if it could leave the layer root."""
    if name.startswith("/"):
        raise UnsafeLayer(f"layer entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"layer entry {name!r} climbs out with '..'")
    return parts


class _Extractor:
    def __init__(self, root_fd: int) -> None:
        self._root_fd = root_fd
        # Directory mtimes are set last: adding children would change them again.
        self._dir_times: list[tuple[list[str], int]] = []

    def add(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        parts = split_entry_name(member.name)
        if not parts:
            self._apply_root(member)
            return
        base = parts[-1]
        parent_fd = self._open_dir(parts[:-1], member.name, create=True)
        try:
            if base == OPAQUE_MARKER:
                os.setxattr(parent_fd, OPAQUE_XATTR, b"y")
            elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                log.debug("skipping aufs metadata entry %s", member.name)
            elif base.startswith(WHITEOUT_PREFIX):
                self._whiteout(parent_fd, base[len(WHITEOUT_PREFIX) :], member.name)
            else:
                self._create(parent_fd, base, parts, member, archive)
        finally:
            os.close(parent_fd)

    def finish(self) -> None:
        for parts, mtime in reversed(self._dir_times):
            parent_fd = self._open_dir(parts[:-1], "/".join(parts), create=False)
            try:
                os.utime(parts[-1], ns=(mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)
            finally:
                os.close(parent_fd)

    # -- path walking ---------------------------------------------------------------------

    def _open_dir(self, parts: list[str], entry: str, *, create: bool) -> int:
        """Open the directory ``parts`` below the root without following any symlink."""
        fd = os.dup(self._root_fd)
        try:
            for component in parts:
                next_fd = self._open_child_dir(fd, component, entry, create)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_child_dir(self, fd: int, component: str, entry: str, create: bool) -> int:
        try:
            return os.open(component, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise UnsafeLayer(f"layer entry {entry!r}: {component!r} does not exist") from None
            os.mkdir(component, 0o755, dir_fd=fd)
            return os.open(component, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            info = os.stat(component, dir_fd=fd, follow_symlinks=False)
            if create and _is_whiteout_device(info):
                # An earlier entry of this layer whited the name out; a directory replaces it.
                os.unlink(component, dir_fd=fd)
                os.mkdir(component, 0o755, dir_fd=fd)
                return os.open(component, _DIR_FLAGS, dir_fd=fd)
            kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a directory"
            raise UnsafeLayer(
                f"layer entry {entry!r} would be written through {component!r}, which is {kind}"
            ) from exc

    # -- entries --------------------------------------------------------------------------

    def _apply_root(self, member: tarfile.TarInfo) -> None:
        if not member.isdir():
            raise UnsafeLayer(f"layer entry {member.name!r} would replace the layer root")
        os.fchown(self._root_fd, member.uid, member.gid)
        os.fchmod(self._root_fd, stat.S_IMODE(member.mode))
        self._set_xattrs(self._root_fd, member)

    def _whiteout(self, parent_fd: int, name: str, entry: str) -> None:
        if name in ("", ".", ".."):
            raise UnsafeLayer(f"layer entry {entry!r} is a whiteout of nothing")
        self._remove_existing(parent_fd, name, keep_dir=False)
        os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=parent_fd)

    def _create(
        self, parent_fd: int, base: str, parts: list[str], member: tarfile.TarInfo,
        archive: tarfile.TarFile,
    ) -> None:
        mode = stat.S_IMODE(member.mode)
        self._remove_existing(parent_fd, base, keep_dir=member.isdir())
        if member.isdir():
            self._make_dir(parent_fd, base, member, mode)
            self._dir_times.append((parts, int(member.mtime * 1e9)))
            return
        if member.isreg():
            self._make_file(parent_fd, base, member, mode, archive)
            return
        if member.issym():
            os.symlink(member.linkname, base, dir_fd=parent_fd)
        elif member.islnk():
            self._make_hardlink(parent_fd, base, member)
            return  # a hard link shares its target's inode, owner and mode
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(base, kind | mode, device, dir_fd=parent_fd)
        elif member.isfifo():
            os.mkfifo(base, mode, dir_fd=parent_fd)
        else:
            log.warning("skipping layer entry %s of unknown type %r", member.name, member.type)
            return
        os.chown(base, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
        if not member.issym():
            # chown clears set-id bits, so the mode goes on afterwards.
            os.chmod(base, mode, dir_fd=parent_fd)
        mtime = int(member.mtime * 1e9)
        os.utime(base, ns=(mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)

    def _make_dir(self, parent_fd: int, base: str, member: tarfile.TarInfo, mode: int) -> None:
        try:
            os.mkdir(base, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass  # kept by _remove_existing: a directory entry only updates metadata
        fd = os.open(base, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, mode)
            self._set_xattrs(fd, member)
        finally:
            os.close(fd)

    def _make_file(
        self, parent_fd: int, base: str, member: tarfile.TarInfo, mode: int,
        archive: tarfile.TarFile,
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(base, flags, 0o600, dir_fd=parent_fd)
        try:
            source = archive.extractfile(member)
            if source is not None:
                while chunk := source.read(BLOCK):
                    _write_all(fd, chunk)
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, mode)
            self._set_xattrs(fd, member)
            mtime = int(member.mtime * 1e9)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)

    def _make_hardlink(self, parent_fd: int, base: str, member: tarfile.TarInfo) -> None:
        target = split_entry_name(member.linkname)
        if not target:
            raise UnsafeLayer(f"layer entry {member.name!r} hard-links the layer root")
        target_parent = self._open_dir(target[:-1], member.name, create=False)
        try:
            info = os.stat(target[-1], dir_fd=target_parent, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                raise UnsafeLayer(f"layer entry {member.name!r} hard-links a directory")
            os.link(target[-1], base, src_dir_fd=target_parent, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        except FileNotFoundError as exc:
            raise UnsafeLayer(
                f"layer entry {member.name!r} hard-links {member.linkname!r}, "
                "which is not in this layer"
            ) from exc
        finally:
            os.close(target_parent)

    def _remove_existing(self, parent_fd: int, base: str, *, keep_dir: bool) -> None:
        try:
            info = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            if not keep_dir:
                shutil.rmtree(base, dir_fd=parent_fd)
        else:
            os.unlink(base, dir_fd=parent_fd)

    def _set_xattrs(self, fd: int, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PAX_PREFIX):
                continue
            name = key[len(_XATTR_PAX_PREFIX) :]
            if name.startswith("trusted.overlay."):
                # Only our own whiteout conversion may steer overlayfs.
                log.warning("dropping xattr %s on layer entry %s", name, member.name)
                continue
            try:
                os.setxattr(fd, name, value.encode("utf-8", "surrogateescape"))
            except OSError as exc:
                log.warning("cannot set xattr %s on %s: %s", name, member.name, exc.strerror)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _is_whiteout_device(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0
