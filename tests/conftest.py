"""Shared fixtures: throwaway namespaces, state directories, and the root-namespace guard."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netns import CREATED, Netns, list_netns, require_root, root_links


@pytest.fixture(scope="session", autouse=True)
def root_namespace_untouched() -> Iterator[None]:
    """No test may add, remove or re-master a link in the machine's own namespace,
    nor leave a namespace of its own behind."""
    if os.geteuid() != 0:
        yield
        return
    before_links = root_links()
    yield
    assert root_links() == before_links, "the root network namespace was changed"
    leaked = CREATED & list_netns()
    assert not leaked, f"namespaces left behind: {sorted(leaked)}"


@pytest.fixture
def netns() -> Iterator[Netns]:
    require_root()
    ns = Netns()
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(state_dir, conf_dir) private to one test."""
    state, conf = tmp_path / "state", tmp_path / "conf"
    state.mkdir()
    conf.mkdir()
    return state, conf
