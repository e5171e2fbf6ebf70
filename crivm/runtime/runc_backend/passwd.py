"""Resolving a container's user from the CRI security context and the image's user database.

Pure functions over the text of the image's ``/etc/passwd`` and ``/etc/group``; the caller
reads those files from the rootfs, so the lookup never follows a symlink out of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from crivm.errors import InvalidArgument


@dataclass(frozen=True)
class ProcessUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    home: str


@dataclass(frozen=True)
class _PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


def _passwd_entries(passwd_text: str) -> list[_PasswdEntry]:
    entries = []
    for line in passwd_text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or line.startswith("#"):
            continue
        try:
            entries.append(_PasswdEntry(fields[0], int(fields[2]), int(fields[3]), fields[5]))
        except ValueError:
            continue
    return entries


def _group_entries(group_text: str) -> list[tuple[str, int, tuple[str, ...]]]:
    entries = []
    for line in group_text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or line.startswith("#"):
            continue
        try:
            members = tuple(m for m in fields[3].split(",") if m)
            entries.append((fields[0], int(fields[2]), members))
        except ValueError:
            continue
    return entries


def resolve_user(
    user: str,
    group_override: int | None,
    supplemental: tuple[int, ...],
    passwd_text: str,
    group_text: str,
) -> ProcessUser:
    """``user`` is ``name``, ``uid``, ``name:group`` or ``uid:gid`` (the image's ``User`` or the
    CRI run_as_user/run_as_username). A numeric uid missing from passwd is allowed, with gid
    0, like docker; a name that is missing is an error."""
    user_part, _, group_part = (user or "0").partition(":")
    passwd = _passwd_entries(passwd_text)
    groups = _group_entries(group_text)

    entry: _PasswdEntry | None
    if user_part.isdigit():
        uid = int(user_part)
        entry = next((e for e in passwd if e.uid == uid), None)
    else:
        entry = next((e for e in passwd if e.name == user_part), None)
        if entry is None:
            raise InvalidArgument(f"user {user_part!r} is not in the image's /etc/passwd")
        uid = entry.uid
    gid = entry.gid if entry else 0
    home = entry.home if entry else "/"

    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            match = next((g for g in groups if g[0] == group_part), None)
            if match is None:
                raise InvalidArgument(f"group {group_part!r} is not in the image's /etc/group")
            gid = match[1]
    if group_override is not None:
        gid = group_override

    additional: list[int] = []
    if entry is not None:
        additional.extend(g[1] for g in groups if entry.name in g[2])
    additional.extend(supplemental)
    ordered = tuple(dict.fromkeys(g for g in additional if g != gid))
    return ProcessUser(uid=uid, gid=gid, additional_gids=ordered, home=home)
