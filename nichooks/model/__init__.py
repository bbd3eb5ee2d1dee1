"""What a NIC is, independent of any caller or mode: its variables parsed and
validated (nic, vlan, validate) and the addresses its guest may use (addresses)."""
