"""Assemble the guest root tree from extracted Debian packages, the protobuf wheel and the agent.

The tree is merged-/usr (``/bin`` -> ``usr/bin`` and so on), holds only the files the guest needs,
and every shared library that its binaries name is checked to be present, so a missing library
fails the build instead of the boot.
"""

from __future__ import annotations

import ast
import compileall
import importlib.util
import logging
import os
import py_compile
import shutil
import stat
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from crivm.guestimage import elf
from crivm.guestimage.errors import GuestImageError
from crivm.guestimage.init_script import GUEST_PYTHONPATH, INIT_SCRIPT, MODULE_LIST

log = logging.getLogger(__name__)

PYTHON_MINOR = "3.11"
# Loaded in this order after their dependencies; names as in modinfo.
KERNEL_MODULES = (
    "virtio_pci", "virtio_mmio", "virtio_console", "virtio_net", "virtio_rng",
    "virtiofs", "vmw_vsock_virtio_transport", "overlay", "virtio_balloon",
    # /usr on virtio-pmem (crivm.usr=pmem); init loads these only then.
    "virtio_pmem", "nd_pmem",
)
# In the image but not loaded at boot (each insmod costs a boot ~50 ms under TCG): the kernel
# asks for them when something uses them (modprobe from modules.dep), as on any host. bridge:
# containers that make bridges (`brctl addbr`, `ip link add type bridge`; critest does).
ON_DEMAND_MODULES = ("bridge",)
# The stdlib extension modules the agent may need; the rest (ssl, sqlite, curses, ...) would pull
# in large libraries for nothing.
PYTHON_EXTENSIONS = (
    "_asyncio", "_contextvars", "_ctypes", "_json", "_multiprocessing", "_posixshmem",
    "_queue", "_typing", "mmap", "resource", "termios",
)
# Top-level stdlib entries the agent never imports. Every MiB of initramfs costs the guest about
# 40 ms of unpacking under TCG and a MiB of host memory per pod (the initrd is copied into guest
# RAM and unpacked again), so mail, web, XML, multiprocessing and tooling modules stay out.
STDLIB_EXCLUDE = frozenset({
    "test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "lib2to3",
    "pydoc_data", "pydoc.py", "distutils", "sqlite3", "dbm", "curses", "venv", "msilib",
    "unittest", "doctest.py", "site-packages", "dist-packages", "__phello__",
    "config-3.11-x86_64-linux-gnu",
    "email", "xml", "http", "html", "xmlrpc", "wsgiref", "urllib", "multiprocessing",
    "zoneinfo", "tomllib", "_pydecimal.py", "decimal.py", "_pyio.py", "pdb.py", "bdb.py",
    "mailbox.py", "mailcap.py", "imaplib.py", "smtplib.py", "smtpd.py", "nntplib.py",
    "ftplib.py", "poplib.py", "telnetlib.py", "cgi.py", "cgitb.py", "tarfile.py",
    "pickletools.py", "aifc.py", "wave.py", "sunau.py", "chunk.py", "sndhdr.py", "imghdr.py",
    "uu.py", "xdrlib.py", "nturl2path.py", "_osx_support.py", "_aix_support.py",
    "antigravity.py", "this.py", "__hello__.py", "webbrowser.py", "profile.py", "cProfile.py",
    "pstats.py", "trace.py", "tracemalloc.py", "timeit.py", "tabnanny.py", "pyclbr.py",
    "symtable.py", "statistics.py", "fractions.py", "plistlib.py", "csv.py",
    "configparser.py", "lzma.py", "bz2.py", "mimetypes.py", "netrc.py", "crypt.py",
    "pipes.py", "ssl.py", "asynchat.py", "asyncore.py", "socketserver.py", "shelve.py",
    "code.py", "codeop.py", "cmd.py", "rlcompleter.py", "modulefinder.py", "zipapp.py",
    "compileall.py", "py_compile.py", "optparse.py", "imp.py", "quopri.py",
    "_sysconfigdata__x86_64-linux-gnu.py", "_sysconfigdata__linux_x86_64-linux-gnu.py",
    "sysconfig.py", "_distutils_system_mod.py", "EXTERNALLY-MANAGED", "LICENSE.txt",
    # Neither the agent nor what it imports (asyncio, logging, json, ctypes, protobuf) loads
    # these, at start or later (checked against the import graph of those modules).
    "difflib.py", "platform.py", "uuid.py", "pprint.py", "gzip.py", "fileinput.py",
    "filecmp.py", "graphlib.py", "sched.py", "colorsys.py", "getpass.py", "secrets.py",
    "_py_abc.py", "_threading_local.py", "zipfile.py",
})
# Files under kept stdlib packages that only other platforms, other executors, or tools load:
# asyncio's Windows event loops, ProcessPoolExecutor, logging's config and handler zoo,
# importlib.metadata (package metadata lookups; nothing in the guest is installed), json's CLI.
STDLIB_EXCLUDE_FILES = frozenset({
    "asyncio/windows_events.py", "asyncio/windows_utils.py", "asyncio/proactor_events.py",
    "asyncio/__main__.py", "concurrent/futures/process.py", "logging/config.py",
    "logging/handlers.py", "json/tool.py", "ctypes/wintypes.py", "ctypes/_aix.py",
    "importlib/metadata",
})
# protobuf's code generator plugin API, its test helpers and benchmarks.
PROTOBUF_EXCLUDE = ("google/protobuf/compiler/", "google/protobuf/testdata/",
                    "google/protobuf/internal/testing_refleaks.py",
                    "google/protobuf/internal/message_benchmark.py",
                    "google/protobuf/internal/json_format_benchmark.py")
# Codecs that are character tables for legacy encodings; the agent speaks UTF-8 and ASCII.
_TABLE_CODEC_PREFIXES = ("cp", "mac_", "iso8859_", "koi8_", "big5", "gb", "euc_", "shift_jis",
                         "iso2022_", "hp_roman8", "johab", "kz1048", "ptcp154", "tis_620",
                         "palmos", "hz", "mbcs", "oem")
# Third-party imports the guest provides; anything else the agent imports fails the build.
GUEST_THIRD_PARTY = frozenset({"google"})
UPB_EXTENSION_PREFIX = "google/_upb/_message."
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
_GUEST_LIB_DIR = "usr/lib/x86_64-linux-gnu"

_ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\ntty:x:5:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "etc/hostname": "crivm\n",
}


def _copy(src: Path, dest: Path, mode: int | None = None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)  # follows symlinks: the guest gets the real bytes
    os.chmod(dest, mode if mode is not None else stat.S_IMODE(src.stat().st_mode))


def _symlink(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def skeleton(root: Path) -> None:
    for name in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "run",
                 "tmp", "root", "mnt", "var/tmp", "etc/crivm"):
        (root / name).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    for top in ("bin", "sbin", "lib", "lib64"):
        _symlink(f"usr/{top}", root / top)
    _symlink("../run", root / "var/run")
    for rel, text in _ETC_FILES.items():
        (root / rel).write_text(text)
    (root / "init").write_text(INIT_SCRIPT)
    os.chmod(root / "init", 0o755)


def install_busybox(staging: Path, root: Path, applets: Iterable[str]) -> None:
    """busybox plus one symlink per applet, placed as ``busybox --list-full`` says."""
    _copy(staging / "bin/busybox", root / "usr/bin/busybox", 0o755)
    for applet in applets:
        rel = applet.strip().lstrip("/")
        if not rel:
            continue
        if rel.startswith(("bin/", "sbin/")):
            rel = "usr/" + rel  # merged /usr
        link = root / rel
        if link.name == "busybox" or link.exists():
            continue
        _symlink("/usr/bin/busybox", link)


def install_oci_runtime(staging: Path, root: Path) -> None:
    """crun, which the agent drives through the runc CLI (init passes ``--runc crun``)."""
    binary = staging / "usr/bin/crun"
    if not binary.exists():
        raise GuestImageError("the crun package holds no crun binary")
    _copy(binary, root / "usr/bin/crun", 0o755)


def install_python(staging: Path, root: Path) -> None:
    binary = staging / f"usr/bin/python{PYTHON_MINOR}"
    if not binary.exists():
        raise GuestImageError(f"python{PYTHON_MINOR}-minimal holds no {binary.name}")
    _copy(binary, root / f"usr/bin/python{PYTHON_MINOR}", 0o755)
    _symlink(f"python{PYTHON_MINOR}", root / "usr/bin/python3")
    src_lib = staging / f"usr/lib/python{PYTHON_MINOR}"
    dest_lib = root / f"usr/lib/python{PYTHON_MINOR}"
    for entry in sorted(src_lib.iterdir()):
        if entry.name in STDLIB_EXCLUDE or entry.name == "lib-dynload":
            continue
        if entry.name == "encodings":
            shutil.copytree(entry, dest_lib / entry.name, symlinks=False,
                            ignore=_ignore_table_codecs)
        elif entry.is_dir():
            shutil.copytree(entry, dest_lib / entry.name, symlinks=False,
                            ignore=_stdlib_package_filter(src_lib))
        else:
            _copy(entry, dest_lib / entry.name)
    suffix = f".cpython-{PYTHON_MINOR.replace('.', '')}-x86_64-linux-gnu.so"
    for name in PYTHON_EXTENSIONS:
        ext = src_lib / "lib-dynload" / (name + suffix)
        if not ext.exists():
            raise GuestImageError(f"the Python stdlib packages hold no {ext.name}")
        _copy(ext, dest_lib / "lib-dynload" / ext.name)


def _stdlib_package_filter(src_lib: Path) -> Callable[[str, list[str]], set[str]]:
    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(src_lib)
        return {name for name in names
                if name in ("__pycache__", "test", "tests")
                or (rel / name).as_posix() in STDLIB_EXCLUDE_FILES}
    return ignore


def _ignore_table_codecs(directory: str, names: list[str]) -> set[str]:
    return {name for name in names
            if name == "__pycache__" or name.startswith(_TABLE_CODEC_PREFIXES)}


def install_protobuf(wheel: Path, root: Path) -> None:
    """The protobuf runtime with its compiled upb backend, from the CPython abi3 wheel.

    Under TCG, importing the agent's generated module with the pure-Python backend costs about
    1.4 s of the guest's boot; upb builds the same descriptors in C. The extension needs only
    libstdc++, libm and libc, which install_libraries then finds through its DT_NEEDED.
    """
    dest = root / GUEST_PYTHONPATH.lstrip("/")
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(archive.namelist())
        if not any(m.startswith(UPB_EXTENSION_PREFIX) for m in members):
            raise GuestImageError(f"{wheel.name} holds no {UPB_EXTENSION_PREFIX}* extension")
        for member in members:
            if (not member.startswith("google/") or member.endswith("/")
                    or member.startswith(PROTOBUF_EXCLUDE)):
                continue
            target = dest / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
            os.chmod(target, 0o755 if member.endswith(".so") else 0o644)


def kernel_version(staging: Path) -> str:
    versions = sorted(p.name for p in (staging / "lib/modules").iterdir() if p.is_dir())
    if len(versions) != 1:
        raise GuestImageError(f"expected one kernel in the image package, found {versions}")
    return versions[0]


def install_kernel_modules(staging: Path, root: Path, kver: str,
                           wanted: Iterable[str] = KERNEL_MODULES,
                           on_demand: Iterable[str] = ON_DEMAND_MODULES) -> list[str]:
    """Copy ``wanted`` and ``on_demand`` modules and their dependencies; write the load order
    of ``wanted`` for init, and modules.dep and modules.alias for the kernel's modprobe."""
    moddir = staging / "lib/modules" / kver
    builtin = {Path(line).stem.replace("-", "_")
               for line in (moddir / "modules.builtin").read_text().split()}
    index: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko")):
        index[path.stem.replace("-", "_")] = path
    order: list[str] = []
    needs: dict[str, list[str]] = {}
    aliases: dict[str, list[str]] = {}
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name in visiting:
            raise GuestImageError(f"kernel module dependency cycle through {name}")
        if name not in index:
            raise GuestImageError(f"kernel {kver} has no module {name}")
        visiting.add(name)
        info = elf.module_info(index[name])
        needs[name] = [dep.replace("-", "_") for dep in elf.depends_of(info)]
        aliases[name] = info.get("alias", [])
        for dep in needs[name]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    boot = list(order)
    for name in on_demand:
        visit(name)
    rel = {name: index[name].relative_to(moddir).as_posix() for name in order}
    for name in order:
        _copy(index[name], root / "usr/lib/modules" / kver / rel[name], 0o644)
    (root / MODULE_LIST.lstrip("/")).write_text("".join(f"{n} {rel[n]}\n" for n in boot))
    (root / "usr/lib/modules" / kver / "modules.dep").write_text(
        "".join(f"{rel[n]}:{''.join(' ' + rel[d] for d in _load_order(n, needs)[::-1])}\n"
                for n in order))
    (root / "usr/lib/modules" / kver / "modules.alias").write_text("".join(
        f"alias {alias} {name}\n" for name in order for alias in aliases[name]))
    return order


def _load_order(name: str, needs: dict[str, list[str]]) -> list[str]:
    """The modules ``name`` needs loaded before it, each after its own needs (modprobe loads
    a modules.dep line's list from its end)."""
    out: list[str] = []

    def walk(current: str) -> None:
        for dep in needs.get(current, ()):
            if dep not in out:
                walk(dep)
                out.append(dep)

    walk(name)
    return out


def install_libraries(staging: Path, root: Path) -> list[str]:
    """Copy the dynamic loader and every library that the tree's ELF files need, transitively."""
    loader = "ld-linux-x86-64.so.2"
    found = _find_library(staging, loader)
    _copy(found, root / _GUEST_LIB_DIR / loader, 0o755)
    _symlink(f"../lib/x86_64-linux-gnu/{loader}", root / "usr/lib64" / loader)
    installed = {loader}
    pending = [p for p in _elf_files(root)]
    while pending:
        path = pending.pop()
        for soname in elf.needed_libraries(path):
            if soname in installed:
                continue
            dest = root / _GUEST_LIB_DIR / soname
            _copy(_find_library(staging, soname), dest, 0o644)
            installed.add(soname)
            pending.append(dest)
    return sorted(installed)


def _find_library(staging: Path, soname: str) -> Path:
    for lib_dir in _LIB_DIRS:
        candidate = staging / lib_dir / soname
        if candidate.exists():
            return candidate
    raise GuestImageError(
        f"no package in the image provides {soname}; add its Debian package to the library list"
    )


def _elf_files(root: Path) -> list[Path]:
    files = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file() or path.suffix == ".ko":
                continue
            if elf.is_elf(path):
                files.append(path)
    return sorted(files)


def agent_sources(source_root: Path) -> dict[str, Path]:
    """The crivm modules the agent imports, found by following its imports from crivm/agent.

    Returns {} when crivm/agent does not exist yet. Imports of packages the guest lacks fail the
    build here rather than at boot.
    """
    agent_dir = source_root / "crivm/agent"
    if not agent_dir.is_dir():
        return {}
    files: dict[str, Path] = {}
    pending = sorted(agent_dir.rglob("*.py"))
    pending.append(source_root / "crivm/__init__.py")
    while pending:
        path = pending.pop()
        rel = path.relative_to(source_root).as_posix()
        if rel in files:
            continue
        files[rel] = path
        for module in _imported_modules(path, rel):
            top = module.split(".")[0]
            if top == "crivm":
                pending.extend(_module_files(source_root, module))
            elif top not in sys.stdlib_module_names and top not in GUEST_THIRD_PARTY:
                raise GuestImageError(
                    f"{rel} imports {module!r}, which the guest does not have; the agent may "
                    "import only the stdlib, protobuf and crivm's agent-side modules"
                )
    return dict(sorted(files.items()))


def _module_files(source_root: Path, module: str) -> list[Path]:
    """The files that importing ``module`` executes: each package __init__ and the module."""
    parts = module.split(".")
    found = []
    for depth in range(1, len(parts) + 1):
        base = source_root.joinpath(*parts[:depth])
        if (base / "__init__.py").exists():
            found.append(base / "__init__.py")
        elif base.with_suffix(".py").exists():
            found.append(base.with_suffix(".py"))
    return found


def _imported_modules(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text(), filename=rel)
    package = rel.removesuffix(".py").replace("/", ".")
    if not rel.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    else:
        package = package.removesuffix(".__init__")
    modules: list[str] = []
    for node in _runtime_nodes(tree.body):
        if isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[:len(base_parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            modules.append(target)
            # ``from pkg import mod`` may name a submodule; _module_files ignores non-files.
            modules.extend(f"{target}.{alias.name}" for alias in node.names)
    return modules


def _runtime_nodes(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """Every statement that runs on import, skipping ``if TYPE_CHECKING`` blocks and imports
    guarded by ``except ImportError``."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _runtime_nodes(node.orelse)
            continue
        if isinstance(node, ast.Try) and any(
            "ImportError" in ast.unparse(h.type) for h in node.handlers if h.type is not None
        ):
            continue
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _runtime_nodes([child])


def install_agent(sources: dict[str, Path], root: Path) -> None:
    dest = root / GUEST_PYTHONPATH.lstrip("/")
    for rel, path in sources.items():
        _copy(path, dest / rel, 0o644)


def compile_python(root: Path) -> None:
    """Precompile every module so the guest never compiles at boot (slow under TCG).

    Unchecked-hash pycs do not depend on file mtimes, which keeps the image reproducible.
    """
    if sys.version_info[:2] != tuple(int(x) for x in PYTHON_MINOR.split(".")):
        log.warning("host Python %s cannot write %s bytecode; the guest compiles at boot",
                    sys.version.split()[0], PYTHON_MINOR)
        return
    log.debug("bytecode magic %s", importlib.util.MAGIC_NUMBER.hex())
    agent_path = GUEST_PYTHONPATH.lstrip("/")
    # The stdlib and protobuf ship as sourceless .pyc beside where the .py was, which halves
    # their share of the initramfs; the agent keeps its sources for readable tracebacks.
    for rel, sourceless in ((f"usr/lib/python{PYTHON_MINOR}", True),
                            (f"{agent_path}/google", True), (f"{agent_path}/crivm", False)):
        directory = root / rel
        if not directory.exists():
            continue
        ok = compileall.compile_dir(
            directory, ddir="/" + rel, quiet=1, workers=0, legacy=sourceless,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        if not ok:
            raise GuestImageError(f"compiling the guest's Python modules under /{rel} failed")
        if sourceless:
            for source in sorted(directory.rglob("*.py")):
                if source.with_suffix(".pyc").exists():
                    source.unlink()
