"""Words users read, in German (the host app's language) and English."""

from __future__ import annotations

from flask import Request

LANGUAGES = ("de", "en")
DEFAULT_LANGUAGE = "de"

TEXTS: dict[str, dict[str, str]] = {
    "de": {
        "title": "mailpipe – Abrufe",
        "login_title": "Anmelden",
        "username": "Benutzername",
        "password": "Passwort",
        "background": "Hintergrundabruf erlauben (auch wenn ich abgemeldet bin)",
        "login": "Anmelden",
        "login_failed": "Benutzername oder Passwort falsch.",
        "login_expired": "Das Anmeldeformular ist abgelaufen. Bitte erneut versuchen.",
        "login_throttled": "Zu viele fehlgeschlagene Anmeldungen. Bitte später erneut versuchen.",
        "logout": "Abmelden",
        "fetch_now": "Jetzt abrufen",
        "fetch_running": "Abruf läuft …",
        "progress": "{done} von {total} Konten fertig",
        "jobs": "Letzte Abrufe",
        "job": "Abruf",
        "account": "Konto",
        "all_accounts": "alle",
        "automatic": "automatisch",
        "status": "Status",
        "duration": "Dauer",
        "mails": "E-Mails",
        "time": "Zeit",
        "no_jobs": "Noch keine Abrufe.",
        "accounts": "Konten",
        "no_accounts": "Noch keine Konten eingerichtet.",
        "last_check": "Zuletzt geprüft",
        "last_fetch": "Zuletzt abgerufen",
        "last_error": "Letzter Fehler",
        "recent": "Letzte Versuche",
        "recent_failures": "{failures} Fehler in den letzten {runs} Versuchen",
        "recent_failures_one": "{failures} Fehler im letzten Versuch",
        "provider_other": "E-Mail",
        "totals": "{jobs} Abrufe, {mails} E-Mails, {rate} % erfolgreich, Ø {seconds} s",
        "job_detail": "Abruf {job}",
        "never": "nie",
        "check": "Verbindung prüfen",
        "checking": "Prüfe …",
        "check_ok": "Verbindung in Ordnung: Anmeldung {connect} s, Antwortzeit {rtt} s.",
        "check_failed": "Prüfung fehlgeschlagen: {message}",
        "check_pending": "Prüfe … ({seconds} s)",
        "check_not_run": "Die Prüfung konnte nicht laufen. Bitte erneut anmelden und noch "
        "einmal prüfen.",
        "check_no_answer": "Noch keine Antwort von den Workern. Bitte später erneut prüfen.",
        "trend": "Verlauf der letzten 7 Tage",
        "trend_mails": "E-Mails pro Tag",
        "trend_duration": "Ø Abrufdauer (s)",
        "trend_day": "{jobs} Abrufe, {succeeded} erfolgreich, {emails} E-Mails",
        "notifications": "Benachrichtigungen",
        "no_notifications": "Keine Benachrichtigungen.",
        "mark_read": "Gelesen",
        "mark_all_read": "Alle als gelesen markieren",
        "language": "Sprache",
        "background_unavailable": "Hintergrundabruf ist gerade nicht verfügbar (Worker-Schlüssel fehlt).",
        "error_too_many_jobs": "Es laufen schon zu viele Abrufe. Bitte warten, bis einer fertig ist.",
        "error_too_many_checks": "Zu viele Verbindungsprüfungen in kurzer Zeit. Bitte eine "
        "Minute warten.",
        "error_key_required": "Bitte erneut anmelden, um E-Mails abzurufen.",
        "error_unauthorized": "Die Sitzung ist abgelaufen. Bitte erneut anmelden.",
        "error_generic": "Das hat nicht geklappt. Bitte später erneut versuchen.",
        "status_pending": "Wartet",
        "status_running": "Läuft",
        "status_retrying": "Neuer Versuch",
        "status_success": "Erfolgreich",
        "status_partial_failure": "Teilweise fehlgeschlagen",
        "status_failed": "Fehlgeschlagen",
        "status_skipped": "Übersprungen",
        "reason_no_accounts": "Keine Konten gefunden: bitte zuerst ein E-Mail-Konto einrichten.",
        "reason_all_skipped": "Nichts abgerufen: jedes Konto wurde übersprungen (nach "
        "wiederholten Fehlern pausiert oder gesperrt).",
        "reason_some_skipped": "Nicht alle Konten abgerufen: {skipped} von {accounts} "
        "übersprungen (nach wiederholten Fehlern pausiert oder gesperrt).",
        "health_HEALTHY": "In Ordnung",
        "health_DEGRADED": "Eingeschränkt",
        "health_BROKEN": "Gestört",
        "health_LOCKED": "Gesperrt (kein Hintergrundabruf erlaubt)",
        "error_timeout": "Der Mailserver hat nicht rechtzeitig geantwortet.",
        "error_connection_reset": "Die Verbindung zum Mailserver wurde unterbrochen.",
        "error_temporarily_unavailable": "Der Mailserver ist vorübergehend nicht erreichbar.",
        "error_auth_failed": "Der Anbieter erlaubt die Anmeldung nicht.",
        "error_invalid_credentials": "Anmeldung fehlgeschlagen, bitte das Passwort neu eingeben.",
        "error_invalid_credentials_oauth2": "Die Anmeldung beim Anbieter ist abgelaufen oder "
        "wurde widerrufen, bitte das Konto neu verbinden.",
        "error_account_disabled": "Das Konto ist beim Anbieter gesperrt oder deaktiviert.",
        "error_tls_error": "Die sichere Verbindung (TLS) zum Mailserver ist fehlgeschlagen.",
        "error_address_not_allowed": "Dieser Mailserver ist nicht erlaubt: Er liegt nicht im "
        "öffentlichen Internet oder nutzt keinen IMAP-Port (143, 993). mailpipe verbindet sich "
        "nicht dorthin.",
        "error_locked": "Nicht abgerufen: bitte erneut anmelden, damit mailpipe das Konto lesen darf.",
        "error_circuit_open": "Übersprungen: Der Abruf dieses Kontos schlug wiederholt fehl; "
        "mailpipe pausiert ihn eine Weile und versucht es dann erneut.",
        "error_unknown": "Beim Abruf ist ein unerwarteter Fehler aufgetreten.",
        "note_account_broken": "{provider}: {error}",
        "note_circuit_open": "{provider}: Der Abruf schlägt immer wieder fehl. {error} mailpipe "
        "pausiert dieses Konto {minutes} Minuten lang und versucht es dann erneut.",
        "note_job_failed": "Abruf fehlgeschlagen. {errors}",
        "note_retries_exhausted": "{provider}: Abruf auch nach allen Wiederholungen "
        "fehlgeschlagen. {error} Die anderen Konten wurden abgerufen; dieses wird beim nächsten "
        "Abruf erneut versucht.",
        "no_account_read": "Kein Konto konnte gelesen werden.",
    },
    "en": {
        "title": "mailpipe – fetches",
        "login_title": "Log in",
        "username": "User name",
        "password": "Password",
        "background": "Allow background fetching (also while I am logged out)",
        "login": "Log in",
        "login_failed": "Wrong user name or password.",
        "login_expired": "The login form has expired. Please try again.",
        "login_throttled": "Too many failed logins. Please try again later.",
        "logout": "Log out",
        "fetch_now": "Fetch now",
        "fetch_running": "Fetching …",
        "progress": "{done} of {total} accounts done",
        "jobs": "Recent fetches",
        "job": "Fetch",
        "account": "Account",
        "all_accounts": "all",
        "automatic": "automatic",
        "status": "Status",
        "duration": "Duration",
        "mails": "Mails",
        "time": "Time",
        "no_jobs": "No fetches yet.",
        "accounts": "Accounts",
        "no_accounts": "No accounts set up yet.",
        "last_check": "Last checked",
        "last_fetch": "Last fetched",
        "last_error": "Last error",
        "recent": "Recent attempts",
        "recent_failures": "{failures} failed of the last {runs} attempts",
        "recent_failures_one": "{failures} failed in the last attempt",
        "provider_other": "Mail",
        "totals": "{jobs} fetches, {mails} mails, {rate} % succeeded, avg. {seconds} s",
        "job_detail": "Fetch {job}",
        "never": "never",
        "check": "Check connection",
        "checking": "Checking …",
        "check_ok": "Connection fine: login {connect} s, round trip {rtt} s.",
        "check_failed": "Check failed: {message}",
        "check_pending": "Checking … ({seconds} s)",
        "check_not_run": "The check could not run. Please log in again and check once more.",
        "check_no_answer": "No answer from the workers yet. Please check again later.",
        "trend": "Last 7 days",
        "trend_mails": "Mails per day",
        "trend_duration": "Avg. fetch time (s)",
        "trend_day": "{jobs} fetches, {succeeded} succeeded, {emails} mails",
        "notifications": "Notifications",
        "no_notifications": "No notifications.",
        "mark_read": "Read",
        "mark_all_read": "Mark all as read",
        "language": "Language",
        "background_unavailable": "Background fetching is unavailable right now (worker key missing).",
        "error_too_many_jobs": "Too many fetches are running already. Please wait for one to finish.",
        "error_too_many_checks": "Too many connection checks in a short time. Please wait a "
        "minute.",
        "error_key_required": "Please log in again to fetch mail.",
        "error_unauthorized": "Your session has expired. Please log in again.",
        "error_generic": "That did not work. Please try again later.",
        "status_pending": "Waiting",
        "status_running": "Running",
        "status_retrying": "Retrying",
        "status_success": "Succeeded",
        "status_partial_failure": "Partly failed",
        "status_failed": "Failed",
        "status_skipped": "Skipped",
        "reason_no_accounts": "No accounts found: set up a mail account first.",
        "reason_all_skipped": "Nothing fetched: every account was skipped (paused after "
        "repeated failures, or locked).",
        "reason_some_skipped": "Not every account was fetched: {skipped} of {accounts} skipped "
        "(paused after repeated failures, or locked).",
        "health_HEALTHY": "Healthy",
        "health_DEGRADED": "Degraded",
        "health_BROKEN": "Broken",
        "health_LOCKED": "Locked (background fetching not allowed)",
        "error_timeout": "The mail server did not answer in time.",
        "error_connection_reset": "The connection to the mail server was interrupted.",
        "error_temporarily_unavailable": "The mail server cannot be reached right now.",
        "error_auth_failed": "The provider does not permit this login.",
        "error_invalid_credentials": "Login failed, please re-enter the password.",
        "error_invalid_credentials_oauth2": "The sign-in with the provider has expired or was "
        "withdrawn, please connect the account again.",
        "error_account_disabled": "The account is locked or disabled at the provider.",
        "error_tls_error": "The secure connection (TLS) to the mail server failed.",
        "error_address_not_allowed": "This mail server is not allowed: it is not on the public "
        "internet or not on an IMAP port (143, 993). mailpipe does not connect there.",
        "error_locked": "Not fetched: log in again so mailpipe may read this account.",
        "error_circuit_open": "Skipped: fetching this account kept failing; mailpipe pauses it "
        "for a while and then tries again.",
        "error_unknown": "Something unexpected went wrong while fetching.",
        "note_account_broken": "{provider}: {error}",
        "note_circuit_open": "{provider}: fetching keeps failing. {error} mailpipe pauses this "
        "account for {minutes} minutes and then tries again.",
        "note_job_failed": "Fetching mail failed. {errors}",
        "note_retries_exhausted": "{provider}: fetching failed even after every retry. {error} "
        "The other accounts were fetched; this one is tried again at the next fetch.",
        "no_account_read": "No account could be read.",
    },
}


def language(request: Request) -> str:
    """`?lang=` wins, then the browser's Accept-Language, then German like the host app."""
    asked = request.args.get("lang", "")
    if asked in LANGUAGES:
        return asked
    return request.accept_languages.best_match(LANGUAGES, default=DEFAULT_LANGUAGE)


def text(lang: str, key: str, **values: object) -> str:
    """One phrase; an unknown key falls back to English, then to the key, never to an error."""
    phrase = TEXTS.get(lang, TEXTS[DEFAULT_LANGUAGE]).get(key) or TEXTS["en"].get(key, key)
    return phrase.format(**values) if values else phrase
