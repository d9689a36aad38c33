"""The worker's plumbing, importable before any actor is declared: the broker, the runtime, the
embedded worker. Nothing here reads the environment; the settings are handed in."""
