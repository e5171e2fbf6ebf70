"""Shared pytest setup. Fixture plugins live in tests/fixtures/; list each module here."""

pytest_plugins = [
    "tests.fixtures.registry",
    "tests.fixtures.images",
    "tests.fixtures.registries_conf",
    "tests.fixtures.netns",
    "tests.fixtures.daemon",
    "tests.fixtures.agent",
    "tests.fixtures.guest",
]
