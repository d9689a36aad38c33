"""Who serves the mail: the fixed set of mail providers (a bounded metric label) and the OAuth2
providers mailpipe can log in through; plain values, so settings and parsers load without a
database or a network library."""

from __future__ import annotations

from dataclasses import dataclass, field

PROVIDERS = ("gmail", "outlook", "yahoo", "gmx", "icloud", "other")
PROVIDER_NAMES = {
    "gmail": "Gmail",
    "outlook": "Outlook",
    "yahoo": "Yahoo",
    "gmx": "GMX",
    "icloud": "iCloud",
    "other": "E-Mail",
}
PROVIDER_HOSTS = {
    "gmail": ("gmail.com", "googlemail.com"),
    "outlook": ("outlook.com", "office365.com", "hotmail.com", "live.com"),
    "yahoo": ("yahoo.com", "yahoo.de"),
    "gmx": ("gmx.net", "gmx.de", "gmx.com"),
    "icloud": ("mail.me.com", "icloud.com"),
}


@dataclass(frozen=True)
class Provider:
    """An OAuth2 provider the operator configured: its endpoints, IMAP scope and server, and
    this installation's client (the secret from the environment or a file, never stored)."""

    name: str
    display: str
    authorize_url: str
    token_url: str
    scope: str
    imap_host: str
    imap_port: int = 993
    imap_security: str = "tls"
    client_id: str = ""
    client_secret: str | None = field(default=None, repr=False)

    @property
    def configured(self) -> bool:
        return bool(self.client_id and self.authorize_url and self.token_url and self.imap_host)


GOOGLE = Provider(
    name="google",
    display="Google",
    authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
    token_url="https://oauth2.googleapis.com/token",
    scope="https://mail.google.com/",
    imap_host="imap.gmail.com",
)
MICROSOFT = Provider(
    name="microsoft",
    display="Microsoft",
    authorize_url="https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
    token_url="https://login.microsoftonline.com/common/oauth2/v2.0/token",
    scope="https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
    imap_host="outlook.office365.com",
)
GENERIC = Provider(
    name="generic", display="OAuth2", authorize_url="", token_url="", scope="", imap_host=""
)
PRESETS = {provider.name: provider for provider in (GOOGLE, MICROSOFT, GENERIC)}
