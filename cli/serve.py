"""`mailpipe web`: mailpipe's own web app, with the jobs run in process on the embedded broker."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mailpipe.errors import MailpipeError

from .common import MAX_PROCESSES, count, nonempty, port

if TYPE_CHECKING:
    from mailpipe.settings import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    web = commands.add_parser("web", help="mailpipe's own web app: dashboard and JSON API")
    web.add_argument("--host", default="127.0.0.1", type=nonempty)
    web.add_argument("--port", type=port, default=8000)
    web.add_argument(
        "--workers",
        type=count(maximum=MAX_PROCESSES),
        default=1,
        help="processes (gunicorn; above 1 needs the Redis broker); default 1, in this process",
    )
    web.set_defaults(run=run_web)


def run_web(args: argparse.Namespace, settings: Settings) -> int:
    """Flask, the broker and the actors load only when this command runs."""
    if args.workers < 1:
        raise MailpipeError("--workers must be 1 or more")
    if args.workers > 1:
        from metrics import multiprocess

        # before the metrics are first imported: their files go into this directory
        multiprocess.prepare()
    from web.app import serve

    return serve(settings, host=args.host, port=args.port, workers=args.workers)
