#!/usr/bin/env python3
"""Summarise critest's Ginkgo JUnit report: counts, then each failed and skipped spec.

    hack/critest-summary.py /tmp/crivm-critest-report/junit.xml

Ginkgo lists every spec of the suite. Those that the focus/skip flags left out carry the bare
message "skipped"; they are counted as "not selected", apart from specs that ran and called
Skip() (for example because the runtime does not advertise a feature).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass

FAILED_STATES = ("failed", "panicked", "interrupted", "aborted", "timedout")
CAUSE_WIDTH = 200
CAUSE_LINES = 4


@dataclass(frozen=True)
class SpecResult:
    name: str
    outcome: str  # passed | failed | skipped | not selected | pending
    detail: str  # first line of the failure or skip message


def _first_line(text: str) -> str:
    """The gist of a Gomega message, which often spreads one fact over lines
    ("Expected / <string>: 11 / to be empty")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[:CAUSE_LINES])[:CAUSE_WIDTH]


def _is_suite_node(name: str) -> bool:
    """[BeforeSuite], [ReportAfterSuite] and the like: counted only when they fail."""
    return name.startswith("[") and name.endswith("]") and " " not in name


def read_report(path: str) -> list[SpecResult]:
    results: list[SpecResult] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "").removeprefix("[It] ")
        status = case.get("status", "")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if status in FAILED_STATES or failure is not None:
            detail = "" if failure is None else failure.get("message", "") or failure.text or ""
            results.append(SpecResult(name, "failed", _first_line(detail)))
        elif skipped is not None:
            message = skipped.get("message", "")
            if message == "skipped":
                results.append(SpecResult(name, "not selected", ""))
            else:
                reason = _first_line(message.removeprefix("skipped - "))
                results.append(SpecResult(name, "skipped", reason))
        elif not _is_suite_node(name):
            results.append(SpecResult(name, status or "passed", ""))
    return results


def _by_name(result: SpecResult) -> str:
    return result.name


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    results = read_report(argv[1])
    counts = Counter(result.outcome for result in results)
    print(
        f"critest: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped (by the spec), {counts['not selected']} not selected"
    )
    for outcome in ("failed", "skipped"):
        for result in sorted((r for r in results if r.outcome == outcome), key=_by_name):
            print(f"  {outcome.upper():7} {result.name}\n          {result.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
