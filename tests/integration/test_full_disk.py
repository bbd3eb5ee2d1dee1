"""A full state directory (a tmpfs /run that ran out of space) on the real kernel.

The state directory is a tiny tmpfs of the test's own. tmpfs counts file data in
whole pages, so leaving N free pages decides exactly which journal write is the
first that cannot be completed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nichooks.engine.journal import Journal
from tests.integration.bridged_env import Site
from tests.support.hooks import one_line
from tests.support.scripts import write_script
from tests.support.state import journals

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def small_site(site: Site) -> Iterator[Site]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "nht-state",
                    str(site.state)], check=True)
    try:
        site.add_bridge("br0")
        site.add_tap()
        yield site
    finally:
        subprocess.run(["umount", str(site.state)], check=True)


def fill_leaving(state: Path, pages: int) -> None:
    """Fill the tmpfs, then free exactly `pages` pages."""
    filler = state / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * PAGE)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size // PAGE * PAGE - pages * PAGE)
    assert os.statvfs(state).f_bavail == pages


def journal_size(data: dict[str, object], records: int) -> int:
    """The size on disk of the journal after the write-ahead of its first `records`."""
    journal = Journal.from_json(data)
    journal.records, journal.state = journal.records[:records], "applying"
    return len(json.dumps(journal.to_json(), indent=1, sort_keys=True).encode())


def leftovers(state: Path) -> list[str]:
    return sorted(str(p.relative_to(state)) for p in state.rglob("*")
                  if p.is_file() and p.name != "filler" and p.parent.name != "locks")


def test_journal_write_that_runs_out_of_space_rolls_back(small_site: Site) -> None:
    site = small_site
    before = site.host.snapshot()
    # Measure the journal as this plan writes it, then pad TAGS so that the write-ahead
    # of step 1 exactly fills one page and that of step 2 needs a second one.
    r = site.hook("kvm-ifup")
    assert r.returncode == 0, r.stderr
    (data,) = journals(site.state)
    assert len(data["records"]) >= 2
    pad = PAGE - journal_size(data, 1)
    assert site.hook("kvm-ifdown").returncode == 0
    assert site.host.snapshot() == before
    tags = "web prod " + " ".join(["t" * 127] * ((pad - 1) // 128))
    tags += " " + "u" * (pad - (len(tags) - len("web prod")) - 1)
    assert len(tags) == len("web prod") + pad
    env = site.env(TAGS=tags)

    # one page for the journal, one for the tap index, one for each rewrite
    fill_leaving(site.state, 3)
    r = site.hook("kvm-ifup", env=env)
    assert r.returncode == 1, r.stderr
    assert "No space left on device" in one_line(r.stderr)
    assert site.host.snapshot() == before
    assert leftovers(site.state) == []  # no journal, no tap claim, no temp file


def test_disk_filled_by_an_ifup_script_still_records_the_plug(small_site: Site) -> None:
    site = small_site
    before = site.host.snapshot()
    write_script(site.conf / "ifup.d", "50-fill", f"cat /dev/zero > {site.state}/filler 2>/dev/null\nexit 0")
    r = site.hook("kvm-ifup")
    assert r.returncode == 0, r.stderr
    # full when the journal was renamed into place: only the page of the journal it
    # replaced is free now
    assert os.statvfs(site.state).f_bavail == 1
    (data,) = journals(site.state)
    assert data["state"] == "applied"
    assert site.host.link("tap0").get("master") == "br0"
    assert [p.name for p in (site.state / "tmp").iterdir()] == []
    r = site.hook("kvm-ifdown")
    assert r.returncode == 0, r.stderr
    assert site.host.snapshot() == before
    assert journals(site.state) == []
