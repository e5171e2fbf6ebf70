"""crivm.storage.heap on this host's glibc, in a child process (mallopt is process-wide).

What it is for (the daemon's RSS after many large pulls) is measured by bench.cri_bench's
images and memory phases; see the module's docstring."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import threading
from crivm.storage import heap
assert heap.use_one_arena(), "glibc refused M_ARENA_MAX"
def churn():
    blocks = []
    for size in range(64):
        blocks.append(bytearray((1 << 20) + 4096 * (size % 7)))
        if len(blocks) > 8:
            blocks.pop(0)
threads = [threading.Thread(target=churn) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
heap.return_freed_memory()
with open("/proc/self/maps") as fh:
    # A thread arena is a 64 MiB-aligned anonymous heap; with one arena there is none.
    arenas = [line for line in fh if line.split()[0].split("-")[0].endswith("000000")
              and len(line.split()) == 5 and line.split()[1] == "rw-p"]
with open("/proc/self/status") as fh:
    rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
print(len(arenas), rss)
"""


def test_threads_share_one_arena_and_the_trim_keeps_rss_low() -> None:
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                            timeout=60, check=True)
    arenas, rss_kib = (int(field) for field in result.stdout.split())
    assert arenas == 0, result.stdout
    assert rss_kib < 64 * 1024, result.stdout
