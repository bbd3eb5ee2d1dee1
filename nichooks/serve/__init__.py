"""The agent as a process: hook calls served warm on a Unix socket, beside the watch
loop of ops/agent.py."""
