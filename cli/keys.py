"""`mailpipe worker-key`: the workers' key pair; web hosts get only its public half."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailpipe.settings import Settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    worker_key = commands.add_parser(
        "worker-key", help="print the workers' public key (base64); --generate makes the pair"
    )
    worker_key.add_argument("--generate", action="store_true")
    worker_key.set_defaults(run=run_worker_key)


def run_worker_key(args: argparse.Namespace, settings: Settings) -> int:
    """Web hosts get the public half as MAILPIPE_WORKER_PUBLIC_KEY; only workers keep the file."""
    from mailpipe import grants

    if args.generate:
        public = grants.generate_worker_key(settings.worker_key_path)
    else:
        public = grants.worker_public_key(
            settings.worker_key_path, configured=settings.worker_public_key
        )
    print(grants.encode_public_key(public))
    return 0
