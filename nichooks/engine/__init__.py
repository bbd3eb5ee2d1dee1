"""The journal lifecycle, independent of modes and callers: records and their kinds,
the journal and the state directory, locks, the write-ahead transaction, custom
scripts. Nothing here imports a driver, a mode or an operation."""
