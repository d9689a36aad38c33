"""Diagnostics of one IMAP connection: what works, what does not and why, in plain words.

`diagnose(settings)` opens its own connection step by step; `run_checks(client)` runs the same
suite on one already logged in; `request_diagnosis` and `run_requested` let a worker run it for
a user and keep the report encrypted for them. The modules:

- `report`: the result types (`Check`, `Diagnosis`), the check names, `summarise`, redaction
- `probe`: the connection the checks share and how one check is run on it
- `checks`: each named check before and after login
- `certificates`: the certificate a TLS server presents
- `database`: the database's view of each folder against the server's
- `suite`: `diagnose` and `run_checks`, the checks in order
- `requests`: requested diagnoses, stored in `diagnostics_results`
"""

from .database import IN_SYNC, MISSING, NEW_MAIL, NOT_SYNCED, UIDVALIDITY_CHANGED
from .report import (
    CAPABILITIES,
    CHECKS,
    CONNECTION,
    DATABASE,
    FAILED,
    FOLDERS,
    INBOX,
    LOGIN,
    LOGIN_MECHANISMS,
    NAMESPACE,
    OK,
    QUOTA,
    ROUND_TRIP,
    SERVER_ID,
    SKIPPED,
    TLS,
    Check,
    Diagnosis,
    summarise,
)
from .requests import (
    REPORT_TABLE,
    diagnosis_result,
    request_diagnosis,
    run_requested,
)
from .suite import DIAGNOSE_TIMEOUT, ROUND_TRIPS, diagnose, run_checks

__all__ = [
    "CAPABILITIES",
    "CHECKS",
    "CONNECTION",
    "DATABASE",
    "DIAGNOSE_TIMEOUT",
    "FAILED",
    "FOLDERS",
    "INBOX",
    "IN_SYNC",
    "LOGIN",
    "LOGIN_MECHANISMS",
    "MISSING",
    "NAMESPACE",
    "NEW_MAIL",
    "NOT_SYNCED",
    "OK",
    "QUOTA",
    "REPORT_TABLE",
    "ROUND_TRIP",
    "ROUND_TRIPS",
    "SERVER_ID",
    "SKIPPED",
    "TLS",
    "UIDVALIDITY_CHANGED",
    "Check",
    "Diagnosis",
    "diagnose",
    "diagnosis_result",
    "request_diagnosis",
    "run_checks",
    "run_requested",
    "summarise",
]
