"""The `mailpipe` command: operator entry points over the core and the pipeline.

The outermost layer: it imports the core, the worker and the web app, and nothing imports it.
`mailpipe` (the console script) and `python -m cli` run `cli.main:main`.
"""
