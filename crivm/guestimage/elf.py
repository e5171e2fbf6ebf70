"""Just enough ELF64 reading to assemble a guest: shared-library needs and kernel-module info.

The build host may lack depmod, ldd's view is the host's libraries rather than the guest's, and
readelf output is not meant for parsing; so the two facts the image builder needs are read
straight from the section and dynamic tables.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_PT_DYNAMIC = 2
_PT_LOAD = 1
_DT_NULL = 0
_DT_NEEDED = 1
_DT_STRTAB = 5


class ElfFormatError(ValueError):
    """The file is not a little-endian ELF64 object, or its tables are inconsistent."""


@dataclass(frozen=True)
class _Section:
    name: str
    offset: int
    size: int


def is_elf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == _ELF_MAGIC


def _check_header(data: bytes) -> None:
    if len(data) < 64 or data[:4] != _ELF_MAGIC:
        raise ElfFormatError("not an ELF file")
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        raise ElfFormatError("only little-endian ELF64 is supported")


def _sections(data: bytes) -> list[_Section]:
    _check_header(data)
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw: list[tuple[int, int, int]] = []
    for index in range(shnum):
        base = shoff + index * shentsize
        name_off = struct.unpack_from("<I", data, base)[0]
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        raw.append((name_off, offset, size))
    if not raw or shstrndx >= len(raw):
        raise ElfFormatError("no section name table")
    names_at = raw[shstrndx][1]
    sections = []
    for name_off, offset, size in raw:
        end = data.index(b"\0", names_at + name_off)
        sections.append(_Section(data[names_at + name_off:end].decode(), offset, size))
    return sections


def module_info(path: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` key=value strings of a kernel module (``depends``, ``name``, ...)."""
    data = path.read_bytes()
    for section in _sections(data):
        if section.name == ".modinfo":
            blob = data[section.offset:section.offset + section.size]
            info: dict[str, list[str]] = {}
            for entry in blob.split(b"\0"):
                key, sep, value = entry.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise ElfFormatError(f"{path}: no .modinfo section")


def module_depends(path: Path) -> list[str]:
    """Names of the modules this kernel module needs loaded first."""
    return depends_of(module_info(path))


def depends_of(info: dict[str, list[str]]) -> list[str]:
    """``module_depends`` from a ``module_info`` already read."""
    values = info.get("depends", [""])
    return [name for name in values[0].split(",") if name]


def needed_libraries(path: Path) -> list[str]:
    """The DT_NEEDED sonames of a dynamically linked executable or library; [] when static."""
    data = path.read_bytes()
    _check_header(data)
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for index in range(phnum):
        base = phoff + index * phentsize
        p_type = struct.unpack_from("<I", data, base)[0]
        p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<QQQQ", data, base + 8)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    needed_offsets: list[int] = []
    strtab_vaddr = None
    offset, size = dynamic
    for pos in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed_offsets.append(value)
        elif tag == _DT_STRTAB:
            strtab_vaddr = value
    if strtab_vaddr is None:
        raise ElfFormatError(f"{path}: dynamic section without a string table")
    strtab = _vaddr_to_offset(loads, strtab_vaddr, path)
    names = []
    for name_off in needed_offsets:
        start = strtab + name_off
        names.append(data[start:data.index(b"\0", start)].decode())
    return names


def _vaddr_to_offset(loads: list[tuple[int, int, int]], vaddr: int, path: Path) -> int:
    for seg_vaddr, seg_offset, seg_size in loads:
        if seg_vaddr <= vaddr < seg_vaddr + seg_size:
            return seg_offset + (vaddr - seg_vaddr)
    raise ElfFormatError(f"{path}: address {vaddr:#x} is in no loaded segment")
