"""Steps shared by the modes, each with its registered undo, check and rebuild."""
