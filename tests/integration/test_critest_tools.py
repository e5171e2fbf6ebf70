"""The C programs the critest images carry (tests/fixtures/static_tools), compiled and run.

critest greps their output, so what matters is checked here: `pgrep` matches names (not the
command line, which would find the `sh -c "pgrep sleep"` running it) and exits 1 on no match;
`ipcs -m` lists a segment's id and prints no digits at all for an empty IPC namespace;
`nnp` prints its effective uid.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures import image_recipes

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
RUN_TIMEOUT = 30


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return image_recipes.compile_userland_tools(tmp_path_factory.mktemp("static-tools"))


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)


def test_tools_are_static(tools: dict[str, Path]) -> None:
    for binary in tools.values():
        result = run(["ldd", str(binary)])
        assert "not a dynamic executable" in result.stdout + result.stderr


def test_pgrep_finds_a_process_by_name_and_not_by_arguments(tools: dict[str, Path]) -> None:
    # A unique name: a copy of sleep called after this test, so host processes cannot match.
    name = "crivmpgreptest"
    binary = tools["pgrep"].parent / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    sleeper = subprocess.Popen([str(binary), "30"])
    try:
        found = run([str(tools["pgrep"]), name])
        assert found.returncode == 0
        assert found.stdout.split() == [str(sleeper.pid)]
        assert found.stderr == ""
        # The name is "crivmpgreptest"; "30" is only in the command line.
        assert run([str(tools["pgrep"]), "-x", "crivmpgrep"]).returncode == 1
        by_cmdline = run([str(tools["pgrep"]), "-f", f"{name} 30$"])
        assert by_cmdline.stdout.split() == [str(sleeper.pid)]
    finally:
        sleeper.kill()
        sleeper.wait(timeout=RUN_TIMEOUT)


def test_pgrep_without_match_prints_nothing_and_exits_1(tools: dict[str, Path]) -> None:
    result = run([str(tools["pgrep"]), "no-process-is-called-this"])
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")


def test_pgrep_rejects_bad_usage(tools: dict[str, Path]) -> None:
    assert run([str(tools["pgrep"])]).returncode == 2
    assert run([str(tools["pgrep"]), "-q", "x"]).returncode == 2


@pytest.mark.root
def test_ipcs_lists_segments_of_its_ipc_namespace(tools: dict[str, Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("a private IPC namespace needs root")
    ipcs = str(tools["ipcs"])
    # In a fresh IPC namespace, so no segment is left on the host.
    made = run(["unshare", "--ipc", "sh", "-c", 'ipcmk -M 4096 && exec "$0" -m', ipcs])
    assert made.returncode == 0, made.stderr
    segment_id = re.search(r"Shared memory id: (\d+)", made.stdout)
    assert segment_id is not None, made.stdout
    rows = [line.split() for line in made.stdout.splitlines() if line.startswith("0x")]
    assert [row[1] for row in rows] == [segment_id.group(1)]
    assert rows[0][4] == "4096"

    empty = run(["unshare", "--ipc", ipcs, "-m"])
    assert empty.returncode == 0
    assert "Shared Memory Segments" in empty.stdout
    # critest checks that the host's segment id is NOT a substring of the output.
    assert not re.search(r"\d", empty.stdout)


def test_nnp_prints_its_effective_uid(tools: dict[str, Path]) -> None:
    result = run([str(tools["nnp"])])
    assert result.returncode == 0
    assert result.stdout == f"Effective uid: {os.geteuid()}\n"
