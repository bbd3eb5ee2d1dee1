"""What a step or an undo talks to: the kernel (netlink, link events, announcements),
Open vSwitch (OVSDB, OpenFlow), composed in host.Host; and the steps (steps/)."""
