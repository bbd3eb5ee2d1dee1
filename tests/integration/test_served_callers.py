"""The caller-facing suites again, with every hook served by an agent
(NICHOOKS_TEST_SERVED=1, tests/support/served.py): QEMU's script=/downscript=, and
Ganeti's calls in bridged, routed and openvswitch mode must see no difference.

They run in a pytest of their own (the switch is process-wide); its agents log each
call they serve, and none may have refused one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.netns import require_root

ROOT = Path(__file__).resolve().parents[2]
SUITES = ["tests/integration/test_qemu.py", "tests/integration/test_bridged.py",
          "tests/integration/test_routed.py", "tests/integration/test_ovs.py"]


@pytest.mark.parametrize("suite", SUITES)
def test_callers_unchanged_when_served(suite: str) -> None:
    require_root()
    # Short: the OVS fixtures' socket paths must fit in sun_path.
    base = Path(tempfile.mkdtemp(prefix="nhs-", dir="/tmp"))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
         f"--basetemp={base}", suite],
        cwd=ROOT, env={**os.environ, "NICHOOKS_TEST_SERVED": "1"}, capture_output=True,
        text=True, timeout=1500)
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-40:])
    assert run.returncode == 0, tail
    logs = [p.read_text(errors="replace") for p in base.rglob("served-agent-*.log")]
    shutil.rmtree(base, ignore_errors=True)
    served = sum(log.count("result=serving") for log in logs)
    refused = [line for log in logs for line in log.splitlines() if "result=refused" in line]
    assert logs and served > 0, f"no hook was served\n{tail}"
    assert refused == [], refused
    print(f"{suite}: {served} hook calls served by {len(logs)} agents")
