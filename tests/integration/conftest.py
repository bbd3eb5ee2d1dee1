"""Fixtures shared by the integration tests: a bridged site and a private OVS switch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.bridged_env import Site
from tests.integration.ovs_env import Switch
from tests.support.netns import Netns, require_root


@pytest.fixture
def site(dirs: tuple[Path, Path]) -> Iterator[Site]:
    """A host namespace and a guest namespace, the state and conf dirs of the test."""
    require_root()
    host, guest = Netns(), Netns()
    try:
        yield Site(host=host, guest=guest, state=dirs[0], conf=dirs[1])
    finally:
        guest.delete()
        host.delete()


@pytest.fixture
def switch(netns: Netns, tmp_path: Path) -> Iterator[Switch]:
    """ovsdb-server and ovs-vswitchd inside `netns`, with an OVS bridge br0."""
    sw = Switch(netns, tmp_path)
    try:
        sw.start()
        sw.add_bridge("br0")
        yield sw
    finally:
        sw.remove_guests()
        sw.stop()
