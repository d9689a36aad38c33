"""mailpipe: the domain core (sync engine, storage, keys); it knows nothing of queues or metrics."""

__version__ = "0.1.0"
