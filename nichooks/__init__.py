"""nichooks: hypervisor NIC hook scripts with an undo journal.

Nothing is imported here on purpose: every hook is a short-lived process and
pays for each import on the instance-start path.
"""

__version__ = "0.1.0"
