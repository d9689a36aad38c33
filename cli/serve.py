"""`mailpipe web`: mailpipe's own web app, with the jobs run in process on the embedded broker."""

from __future__ import annotations

import argparse

from mailpipe.settings import Settings

from .common import nonempty, port


def add_commands(commands: argparse._SubParsersAction) -> None:
    web = commands.add_parser("web", help="mailpipe's own web app: dashboard and JSON API")
    web.add_argument("--host", default="127.0.0.1", type=nonempty)
    web.add_argument("--port", type=port, default=8000)
    web.set_defaults(run=run_web)


def run_web(args: argparse.Namespace, settings: Settings) -> int:
    """Flask, the broker and the actors load only when this command runs."""
    from web.app import serve

    return serve(settings, host=args.host, port=args.port)
