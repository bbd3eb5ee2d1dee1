"""Values the test environments share."""

from __future__ import annotations

from pathlib import Path

# The guest's MAC as Ganeti passes it (MAC=), in every mode's environment.
GUEST_MAC = "aa:00:00:11:22:33"
# A second NIC on the same host: its MAC and its INTERFACE_UUID.
OTHER_MAC = "aa:00:00:44:55:66"
OTHER_UUID = "0c3b4ad5-1c9e-4b5e-9d1a-6f1f2f3e4d5c"

# Open vSwitch installed (the tests run ovsdb-server and ovs-vswitchd of their own).
HAVE_OVS = Path("/usr/sbin/ovs-vswitchd").exists()
NO_OVS = "openvswitch-switch is not installed"
