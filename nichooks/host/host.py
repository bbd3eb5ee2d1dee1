"""What a step or an undo function talks to: the drivers of one host, composed. The
kernel's rtnetlink (`netlink`, opened on first request) and, opened only when a step
first asks, the Open vSwitch database and OpenFlow switch, and libnftables.

Undo functions receive only this object and a JSON record, so everything they need
to reach (the OVSDB remote, OVS_RUNDIR, timeouts) comes from the settings here,
never from the record: a journal written before an operator moved the OVSDB socket
still undoes against the socket in use now.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nichooks.host.netlink import Netlink

if TYPE_CHECKING:
    from nichooks.host.nft import Nft
    from nichooks.host.openflow import OpenFlow
    from nichooks.host.ovsdb import Ovsdb
    from nichooks.settings import Settings


class Host:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.netlink = Netlink()
        self._ovsdb: Ovsdb | None = None
        self._nft: Nft | None = None

    def open(self) -> None:
        """Import pyroute2 and open the rtnetlink socket now (~100 ms): a hook does it
        before taking the NIC's locks, not while holding them."""
        self.netlink.ipr  # noqa: B018

    def ovsdb(self) -> Ovsdb:
        if self._ovsdb is None:
            from nichooks.host.ovsdb import Ovsdb

            self._ovsdb = Ovsdb(self.settings.ovsdb, self.settings.ovs_timeout)
        return self._ovsdb

    def nft(self) -> Nft:
        """libnftables, loaded on first use (bridged and routed filters)."""
        if self._nft is None:
            from nichooks.host.nft import Nft

            self._nft = Nft()
        return self._nft

    def openflow(self) -> OpenFlow:
        from nichooks.host.openflow import OpenFlow

        return OpenFlow(self.settings.ovs_rundir, self.settings.ovs_timeout)

    def drop_ovsdb(self) -> None:
        """Forget the OVSDB replica: a long-lived caller (the agent) reads afresh, since
        the IDL only learns of others' changes while it is being run."""
        if self._ovsdb is not None:
            self._ovsdb.close()
            self._ovsdb = None

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None
        if self._ovsdb is not None:
            self._ovsdb.close()
            self._ovsdb = None
        self.netlink.close()
