"""What the tests share, one module per kind of thing:

- netns: throwaway network namespaces (`Netns`), what is observed in them, the
  root-namespace guard's readings, `require_root`;
- hooks: running the installed hooks (`bin_path`, `hook_env`), their one error line
  (`one_line`), and `wait_for`, polling for an effect with a deadline;
- constants: the guest MACs and second NIC UUID the environments share, `HAVE_OVS`;
- state: the state directory read with plain file reads (journals, tap index);
- scripts: custom ifup.d/ifdown.d scripts (`write_script`);
- links: a tap plugged into a Linux bridge, as `ip -j` shows it;
- packets: Ethernet frames built and read by hand (ARP, NA/NS/RA, UDP, EUI-64);
- frames: raw frames in and out of a namespace: `Listener` captures, control frames,
  and the announcement capture the routed and announce tests use.
"""
