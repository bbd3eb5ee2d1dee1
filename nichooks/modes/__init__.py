"""One module per way of plugging a NIC, each a Mode (base.py), all in registry.py."""
