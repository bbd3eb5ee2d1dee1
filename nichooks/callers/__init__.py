"""Where NIC data comes from: the environment, Ganeti's runtime files, Xen NIC files,
xenstore, and our own spec files for plain QEMU.

Kept apart from what is done with the data (plans) and from doing it (backends),
so that each source can be tested with nothing but files, and so that a hook that
was given a full environment never pays for reading any of the others.
"""
