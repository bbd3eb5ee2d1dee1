"""What nichooks does, composed from the engine, the modes and the host: plug,
unplug, settle, sweep, verify and repair, and the agent that runs them late."""
