"""Prometheus metrics for mailpipe: the catalogue, the core's observer, and the /metrics exporter.

Import `metrics.catalogue` (or `metrics.observer`) only in processes that record, after
`PROMETHEUS_MULTIPROC_DIR` is set: prometheus_client picks its storage when first imported.
"""
