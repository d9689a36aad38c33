"""Errors the core raises, each carrying a one-line message fit to show a user."""


class MailpipeError(Exception):
    """Base class: `str(error)` is a single line naming the cause, without secrets."""


class WrongPassword(MailpipeError):
    """The password does not unlock the user's data key."""


class DecryptionFailed(MailpipeError):
    """A ciphertext was tampered with, moved to another row, or belongs to another key."""


class NotFound(MailpipeError):
    """A user, account or job does not exist, or belongs to someone else."""


class TooManyRequests(MailpipeError):
    """The caller asked too often; `retry_after` says in how many seconds it may ask again."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class ProtocolError(MailpipeError):
    """The server does not speak the IMAP we need, or sent a response that is not valid IMAP."""
