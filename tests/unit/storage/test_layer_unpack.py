"""Layer unpacking: whiteout conversion, metadata, and every way out of the layer root.

Every test here goes through ``unpack_stream``, the path a pull takes, fed from the blob file
in pieces as a download would be."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from crivm.storage.blobs import DigestMismatch
from crivm.storage.layer_unpack import (
    OPAQUE_XATTR,
    CorruptLayer,
    UnpackResult,
    UnsafeLayer,
    split_entry_name,
    unpack_stream,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted.*)")


def _entry(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_600_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _layer(tmp: Path, entries: list[tuple[tarfile.TarInfo, bytes]], *, gz: bool = True) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            if info.isreg():
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    raw = buffer.getvalue()
    path = tmp / "layer.tar.gz"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    (tmp / "raw.sha256").write_text(hashlib.sha256(raw).hexdigest())
    return path


def unpack_layer(blob: Path, dest: Path, piece: int = 64 * 1024) -> UnpackResult:
    """Unpack the blob file as a pull would, in pieces of ``piece`` bytes."""
    data = blob.read_bytes()
    pieces = iter([data[i:i + piece] for i in range(0, len(data), piece)])
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return unpack_stream(lambda: next(pieces, b""), dest, digest, "test")


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_split_entry_name_accepts_relative_paths() -> None:
    assert split_entry_name("./usr/bin/sh") == ["usr", "bin", "sh"]
    assert split_entry_name("etc//passwd") == ["etc", "passwd"]
    assert split_entry_name("./") == []


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a/b/../../../x", ".."])
def test_split_entry_name_rejects_escapes(name: str) -> None:
    with pytest.raises(UnsafeLayer):
        split_entry_name(name)


@pytest.mark.parametrize("gz", [True, False])
def test_regular_files_and_diff_id(tmp_path: Path, dest: Path, gz: bool) -> None:
    blob = _layer(tmp_path, [(_entry("bin", tarfile.DIRTYPE), b""),
                             (_entry("bin/hello", mode=0o755), b"hi\n")], gz=gz)
    result = unpack_layer(blob, dest)
    assert (dest / "bin/hello").read_bytes() == b"hi\n"
    assert stat.S_IMODE((dest / "bin/hello").stat().st_mode) == 0o755
    assert result.diff_id == "sha256:" + (tmp_path / "raw.sha256").read_text()
    assert (dest / "bin").stat().st_mtime == 1_600_000_000


def test_missing_parents_are_created(tmp_path: Path, dest: Path) -> None:
    unpack_layer(_layer(tmp_path, [(_entry("a/b/c.txt"), b"x")]), dest)
    assert (dest / "a/b/c.txt").read_bytes() == b"x"


@needs_root
def test_metadata_setuid_owner_xattr_devices(tmp_path: Path, dest: Path) -> None:
    su = _entry("usr/bin/su", mode=0o4755, uid=0, gid=0)
    owned = _entry("home/u/file", uid=1234, gid=5678, mode=0o600)
    xattr = _entry("cap", pax_headers={"SCHILY.xattr.user.note": "hello"})
    null = _entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    fifo = _entry("run/fifo", tarfile.FIFOTYPE)
    link = _entry("lnk", tarfile.SYMTYPE, linkname="/etc/outside")
    hard = _entry("usr/bin/su2", tarfile.LNKTYPE, linkname="usr/bin/su")
    blob = _layer(tmp_path, [(su, b"su"), (owned, b"o"), (xattr, b""), (null, b""),
                             (fifo, b""), (link, b""), (hard, b"")])
    unpack_layer(blob, dest)
    assert stat.S_IMODE((dest / "usr/bin/su").stat().st_mode) == 0o4755
    st = (dest / "home/u/file").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o600)
    assert os.getxattr(dest / "cap", "user.note") == b"hello"
    dev = (dest / "dev/null").lstat()
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO((dest / "run/fifo").lstat().st_mode)
    assert os.readlink(dest / "lnk") == "/etc/outside"
    assert (dest / "usr/bin/su2").stat().st_ino == (dest / "usr/bin/su").stat().st_ino


@needs_root
def test_whiteouts_become_overlay_form(tmp_path: Path, dest: Path) -> None:
    blob = _layer(tmp_path, [
        (_entry("etc", tarfile.DIRTYPE), b""),
        (_entry("etc/.wh.motd"), b""),
        (_entry("var/cache", tarfile.DIRTYPE), b""),
        (_entry("var/cache/.wh..wh..opq"), b""),
        (_entry("var/cache/kept"), b"k"),
    ])
    unpack_layer(blob, dest)
    motd = (dest / "etc/motd").lstat()
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == 0
    assert not (dest / "etc/.wh.motd").exists()
    assert os.getxattr(dest / "var/cache", OPAQUE_XATTR) == b"y"
    assert not (dest / "var/cache/.wh..wh..opq").exists()
    assert (dest / "var/cache/kept").read_bytes() == b"k"


def test_overlay_xattrs_from_the_tar_are_dropped(tmp_path: Path, dest: Path) -> None:
    evil = _entry("d", tarfile.DIRTYPE,
                  pax_headers={"SCHILY.xattr.trusted.overlay.redirect": "/etc"})
    unpack_layer(_layer(tmp_path, [(evil, b"")]), dest)
    with pytest.raises(OSError):
        os.getxattr(dest / "d", "trusted.overlay.redirect")


def test_later_entry_replaces_earlier(tmp_path: Path, dest: Path) -> None:
    blob = _layer(tmp_path, [
        (_entry("x", tarfile.SYMTYPE, linkname="/etc/passwd"), b""),
        (_entry("x"), b"replaced"),
    ])
    unpack_layer(blob, dest)
    assert not (dest / "x").is_symlink()
    assert (dest / "x").read_bytes() == b"replaced"


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([(_entry("../escape"), b"x")], id="dotdot"),
        pytest.param([(_entry("/abs"), b"x")], id="absolute"),
        pytest.param([(_entry("a/../../escape"), b"x")], id="nested-dotdot"),
        pytest.param(
            [(_entry("link", tarfile.SYMTYPE, linkname="/tmp"), b""),
             (_entry("link/escape"), b"x")], id="write-through-absolute-symlink"),
        pytest.param(
            [(_entry("link", tarfile.SYMTYPE, linkname="../.."), b""),
             (_entry("link/escape"), b"x")], id="write-through-relative-symlink"),
        pytest.param(
            [(_entry("d", tarfile.DIRTYPE), b""),
             (_entry("d/link", tarfile.SYMTYPE, linkname="/"), b""),
             (_entry("d/link/etc/escape"), b"x")], id="write-through-nested-symlink"),
        pytest.param([(_entry("h", tarfile.LNKTYPE, linkname="/etc/passwd"), b"")],
                     id="hardlink-absolute"),
        pytest.param([(_entry("h", tarfile.LNKTYPE, linkname="../../etc/passwd"), b"")],
                     id="hardlink-dotdot"),
        pytest.param(
            [(_entry("link", tarfile.SYMTYPE, linkname="/etc"), b""),
             (_entry("h", tarfile.LNKTYPE, linkname="link/passwd"), b"")],
            id="hardlink-through-symlink"),
        pytest.param([(_entry("h", tarfile.LNKTYPE, linkname="missing"), b"")],
                     id="hardlink-to-missing"),
        pytest.param(
            [(_entry("link", tarfile.SYMTYPE, linkname="/etc"), b""),
             (_entry("link/.wh.passwd"), b"")], id="whiteout-through-symlink"),
    ],
)
def test_escapes_are_rejected(
    tmp_path: Path, dest: Path, entries: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    blob = _layer(tmp_path, entries)
    with pytest.raises(UnsafeLayer):
        unpack_layer(blob, dest)
    # dest is tmp_path/out, so a relative escape would land in tmp_path.
    assert not (tmp_path / "escape").exists()
    assert not Path("/tmp/escape").exists()


def test_truncated_layer_is_corrupt(tmp_path: Path, dest: Path) -> None:
    blob = _layer(tmp_path, [(_entry("big"), os.urandom(100_000))])
    blob.write_bytes(blob.read_bytes()[:5000])
    with pytest.raises(CorruptLayer):
        unpack_layer(blob, dest)


def test_a_blob_that_does_not_hash_to_its_digest_is_refused(tmp_path: Path, dest: Path) -> None:
    blob = _layer(tmp_path, [(_entry("a"), b"x")])
    data = blob.read_bytes()
    pieces = iter([data])
    with pytest.raises(DigestMismatch, match="should be sha256:0000"):
        unpack_stream(lambda: next(pieces, b""), dest, "sha256:" + "0" * 64, "test")


@pytest.mark.parametrize("right_digest", [True, False])
def test_damaged_download_is_reported_as_such_not_as_a_bad_tar(
    tmp_path: Path, dest: Path, right_digest: bool
) -> None:
    """Bytes that are no tar: CorruptLayer when they are what the digest names, else the
    mismatch, found by reading the download to its end after the tar failed."""
    data = b"\xff" * 5000
    pieces = iter([data[:1000], data[1000:]])
    digest = "sha256:" + hashlib.sha256(data if right_digest else b"other").hexdigest()
    expected = CorruptLayer if right_digest else DigestMismatch
    with pytest.raises(expected):
        unpack_stream(lambda: next(pieces, b""), dest, digest, "test")
    assert next(pieces, None) is None, "the whole download was read"


def _tree(root: Path, made_now: set[str]) -> dict[str, tuple[object, ...]]:
    """Everything that defines an unpacked layer, per path; ``made_now`` has no tar entry of
    its own (parents made on the way, whiteout devices), so its mtime is the unpack's."""
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        st = path.lstat()
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        xattrs = {name: os.getxattr(path, name, follow_symlinks=False)
                  for name in os.listxattr(path, follow_symlinks=False)}
        found[name] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_nlink,
                       None if name in made_now else st.st_mtime_ns, content, xattrs)
    return found


@needs_root
def test_piece_boundaries_do_not_change_the_result(tmp_path: Path) -> None:
    """Whiteouts, opaque dirs, hard and symbolic links, devices, xattrs and a file larger
    than a block: the same tree and diff_id however the download is cut up."""
    blob = _layer(tmp_path, [
        (_entry("etc", tarfile.DIRTYPE), b""),
        (_entry("etc/.wh.motd"), b""),
        (_entry("var/cache", tarfile.DIRTYPE), b""),
        (_entry("var/cache/.wh..wh..opq"), b""),
        (_entry("var/cache/kept", uid=7, gid=8, mode=0o4750), b"k"),
        (_entry("big", pax_headers={"SCHILY.xattr.user.n": "v"}), os.urandom(3 << 20)),
        (_entry("hard", tarfile.LNKTYPE, linkname="big"), b""),
        (_entry("sym", tarfile.SYMTYPE, linkname="../nowhere"), b""),
        (_entry("dev/tty", tarfile.CHRTYPE, devmajor=5, devminor=0), b""),
    ])
    trees = []
    for piece in (7, 4096, 1 << 20, 1 << 24):
        out = tmp_path / f"out-{piece}"
        out.mkdir()
        result = unpack_layer(blob, out, piece)
        assert result.diff_id == "sha256:" + (tmp_path / "raw.sha256").read_text()
        trees.append(_tree(out, {"var", "dev", "etc/motd"}))
    assert trees[0]["etc/motd"][3] == 0 and trees[0]["hard"][4] == 2
    assert trees[0]["var/cache"][7] == {OPAQUE_XATTR: b"y"}
    assert all(tree == trees[0] for tree in trees[1:])
