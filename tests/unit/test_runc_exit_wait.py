"""Exit waits on conmon's pidfd, the exit watches and the bundle trash, against real child
processes and real directories (no conmon: a child process plays its part by writing the exit
file and exiting, which is all the waits look at)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from crivm.runtime.runc_backend.conmon import ContainerLayout
from crivm.runtime.runc_backend.environment import LayoutTrash, wait_for_exit
from crivm.runtime.runc_backend.exit_watch import ExitWatches

# Writes the exit file after a delay, then exits, as conmon does after reaping a container.
_FAKE_CONMON = (
    "import sys, time\n"
    "time.sleep(float(sys.argv[2]))\n"
    "open(sys.argv[1], 'w').write('0')\n"
)


def _layout(tmp_path: Path) -> ContainerLayout:
    layout = ContainerLayout.under(str(tmp_path / "run"), str(tmp_path / "root"), "c1", "")
    for directory in (layout.bundle, layout.persist_dir, layout.exit_dir):
        os.makedirs(directory)
    return layout


async def _start_monitor(layout: ContainerLayout, delay_s: float) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FAKE_CONMON, layout.exit_file, str(delay_s)
    )
    Path(layout.conmon_pidfile).write_text(str(proc.pid))
    return proc


async def test_wait_wakes_when_the_monitor_exits_not_on_a_poll_tick(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    proc = await _start_monitor(layout, 0.3)
    waited = asyncio.create_task(wait_for_exit(layout, 10.0))
    await proc.wait()  # reaps it, so the pidfd sees a gone process as conmon's would be
    started = time.monotonic()
    record = await asyncio.wait_for(waited, 5.0)
    assert record is not None and record.exit_code == 0
    assert time.monotonic() - started < 0.1


async def test_wait_times_out_while_the_monitor_runs(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    proc = await _start_monitor(layout, 30)
    try:
        started = time.monotonic()
        assert await wait_for_exit(layout, 0.4) is None
        assert 0.35 < time.monotonic() - started < 2.0
    finally:
        proc.kill()
        await proc.wait()


async def test_wait_polls_without_a_monitor_pid(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    asyncio.get_running_loop().call_later(0.2, Path(layout.exit_file).write_text, "3")
    record = await wait_for_exit(layout, 5.0)
    assert record is not None and record.exit_code == 3


async def test_exit_watch_follows_the_process(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    proc = await _start_monitor(layout, 0.2)
    watches = ExitWatches()
    watches.watch("c1", proc.pid)
    assert watches.monitor_alive("c1")
    await proc.wait()
    for _ in range(100):
        if not watches.monitor_alive("c1"):
            break
        await asyncio.sleep(0.01)
    assert not watches.monitor_alive("c1")
    watches.watch("gone", proc.pid)  # reaped: no watch, callers read the files
    assert not watches.monitor_alive("gone")
    watches.close()


async def test_trash_moves_dirs_aside_and_deletes_them(tmp_path: Path) -> None:
    trash = LayoutTrash((str(tmp_path / "t1"), str(tmp_path / "t2")))
    bundle = tmp_path / "bundle"
    (bundle / "sub").mkdir(parents=True)
    (bundle / "sub" / "f").write_text("x")
    trash.discard(str(bundle), trash.runroot_dir)
    assert not bundle.exists()
    trash.discard(str(tmp_path / "missing"), trash.runroot_dir)  # gone already is fine
    await trash.drain()
    assert os.listdir(trash.runroot_dir) == []
    (tmp_path / "t2" / "left-by-a-crash").mkdir(parents=True)
    trash.sweep()
    assert not (tmp_path / "t2").exists()
