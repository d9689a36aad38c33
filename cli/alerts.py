"""`mailpipe alerts`: the operator alerts Alertmanager delivered to the web app's webhook."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .common import MAX_LIMIT, count, open_database

if TYPE_CHECKING:
    from mailpipe.settings import Settings

DEFAULT_LIMIT = 20


def add_commands(commands: argparse._SubParsersAction) -> None:
    alerts = commands.add_parser(
        "alerts", help="operator alerts Alertmanager sent to the web app, newest first"
    )
    alerts.add_argument(
        "--limit", type=count(maximum=MAX_LIMIT), default=DEFAULT_LIMIT, help="at most this many"
    )
    alerts.add_argument("--json", action="store_true")
    alerts.set_defaults(run=run_alerts)


def run_alerts(args: argparse.Namespace, settings: Settings) -> int:
    """They belong to no user, so no web page shows them: operators read them here."""
    from mailpipe import health

    sessions = open_database(settings)
    with sessions() as session:
        notes = health.operator_alerts(session, limit=args.limit)
    if args.json:
        print(json.dumps([note.to_json() for note in notes]))
        return 0
    for note in notes:
        print(f"{note.created_at.isoformat()}  {note.severity:<8}  {note.message}")
    if not notes:
        print("no alerts")
    return 0
