import asyncio
import json
import logging
from collections.abc import Iterator

import pytest

from crivm.runtime import log as requestlog


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_request_id_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    requestlog.setup("info", "json")
    token = requestlog.request_id.set("abcd1234")
    try:
        logging.getLogger("crivm.test").info("made %s", "pod", extra={"pod_id": "p1"})
    finally:
        requestlog.request_id.reset(token)
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["msg"] == "made pod"
    assert entry["request_id"] == "abcd1234"
    assert entry["pod_id"] == "p1"
    assert entry["level"] == "info"


def test_request_id_reaches_tasks_spawned_by_the_call(capsys: pytest.CaptureFixture[str]) -> None:
    requestlog.setup("info", "text")

    async def worker() -> None:
        logging.getLogger("crivm.t").info("in task")

    async def main() -> None:
        requestlog.request_id.set("feedbeef")
        await asyncio.create_task(worker())

    asyncio.run(main())
    assert "[feedbeef] in task" in capsys.readouterr().err
