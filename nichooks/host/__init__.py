"""The plumbing, one module per mechanism; every step there has a registered undo."""
