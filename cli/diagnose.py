"""`mailpipe diagnose`: one IMAP connection checked step by step, for any server or an account."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from mailpipe.errors import MailpipeError

from .common import (
    EXIT_FAILURE,
    SECURITY_MODES,
    amount,
    nonempty,
    open_database,
    port,
    row_id,
    secret,
    unlock,
)

if TYPE_CHECKING:  # x509 and IMAP are loaded only when diagnosing
    from mailpipe.diagnostics import Diagnosis
    from mailpipe.settings import Settings

MAX_STEP_SECONDS = 600.0
STEP_SECONDS = 15.0  # mailpipe.diagnostics.DIAGNOSE_TIMEOUT, without loading it for a parser


def add_commands(commands: argparse._SubParsersAction) -> None:
    diagnose = commands.add_parser(
        "diagnose",
        help="check one IMAP connection step by step: --host ... for any server, "
        "or --account ID for a stored account",
    )
    diagnose.add_argument(
        "--host", type=nonempty, help="IMAP server (with --user as the IMAP login name)"
    )
    diagnose.add_argument("--port", type=port)
    diagnose.add_argument(
        "--user",
        required=True,
        type=nonempty,
        help="IMAP login name, or with --account the mailpipe user",
    )
    diagnose.add_argument(
        "--account", type=row_id, dest="account_id", help="a stored account of the mailpipe user"
    )
    diagnose.add_argument(
        "--password-env",
        metavar="VAR",
        help="variable with the IMAP password, or with --account the mailpipe user's "
        "(default: prompt)",
    )
    diagnose.add_argument("--security", choices=SECURITY_MODES, help="default: tls")
    diagnose.add_argument("--ca-file", help="trust this CA bundle instead of the system's")
    diagnose.add_argument(
        "--timeout",
        type=amount(maximum=MAX_STEP_SECONDS),
        default=STEP_SECONDS,
        help="seconds per step",
    )
    diagnose.add_argument("--json", action="store_true", help="print one JSON object")
    diagnose.set_defaults(run=run_diagnose)


def run_diagnose(args: argparse.Namespace, settings: Settings) -> int:
    """Diagnose any server from its address, or a stored account unlocked by its owner."""
    from dataclasses import replace

    from mailpipe import diagnostics
    from mailpipe.accounts import account_settings, has_oauth2_grant, owned_account
    from mailpipe.imap import ImapSettings
    from mailpipe.oauth2 import TokenSource

    if (args.host is None) == (args.account_id is None):
        raise MailpipeError("give --host (any server) or --account (a stored account)")
    if args.account_id is None:
        imap = ImapSettings(
            host=args.host,
            port=args.port,
            username=args.user,
            password=secret(args.password_env, f"IMAP password for {args.user}: "),
            security=args.security or "tls",
            ca_file=args.ca_file,
        )
        diagnosis = diagnostics.diagnose(imap, timeout=args.timeout)
    else:
        if args.port is not None or args.security is not None or args.ca_file is not None:
            raise MailpipeError("--port, --security and --ca-file go with --host, not --account")
        sessions = open_database(settings)
        user, key = unlock(sessions, args.user, args.password_env, key_dir=settings.owner_key_path)
        with sessions() as session:
            account = owned_account(session, args.account_id, user.id)
            imap = account_settings(account, key, policy=settings.address_policy)
            refreshable = has_oauth2_grant(account, key)
        if refreshable:  # an OAuth2 account is checked with a fresh token, as a fetch would
            tokens = TokenSource(
                sessions, args.account_id, key, providers=settings.oauth2_providers
            )
            imap = replace(imap, access_token=tokens.token())
        diagnosis = diagnostics.diagnose(
            imap, sessions=sessions, account_id=args.account_id, key=key, timeout=args.timeout
        )
    print(json.dumps(diagnosis.to_json()) if args.json else describe_diagnosis(diagnosis))
    return 0 if diagnosis.ok else EXIT_FAILURE


def describe_diagnosis(diagnosis: Diagnosis) -> str:
    """One line per check, then the verdict and, on failure, what to act on."""
    from mailpipe import diagnostics

    lines = [
        f"{check.status:<8} {check.name:<17} {diagnostics.summarise(check)}"
        for check in diagnosis.checks
    ]
    failure = diagnosis.failure
    lines.append(f"failed at {failure.name}: {failure.reason}" if failure else "every check passed")
    return "\n".join(lines)
