"""The dashboard in headless Chromium: log in, press "Jetzt abrufen", watch the job finish,
then check two accounts' connections.

The app runs on a real HTTP server on loopback; an in-process Dramatiq worker runs the job
against the real Dovecot, as in tests/test_pipeline.py. Screenshots go to artifacts/.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import update
from werkzeug.serving import make_server

from mailpipe import jobs
from mailpipe.models import MailAccount, PipelineJob, utcnow
from mailpipe.vocabulary import JobType
from tests.test_sync import message
from tests.test_web_api import PASSWORD, Site, site, worker  # noqa: F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
JOB_SECONDS = 30
# (days ago, mails, seconds): earlier fetches, so the 7-day trend has something to show
HISTORY = [(6, 12, 1.8), (5, 4, 0.9), (4, 0, 0.4), (3, 9, 1.5), (2, 21, 2.6), (1, 7, 1.1)]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium"
)


@pytest.fixture
def server(site: Site) -> Iterator[str]:  # noqa: F811  (the imported fixture)
    """The app on a real HTTP server on 127.0.0.1 and a free port."""
    http = make_server("127.0.0.1", 0, site.app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()
        thread.join()


@pytest.fixture
def page() -> Iterator[Page]:
    """A German-speaking headless Chromium page that records errors and where it went."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(
            locale="de-DE", timezone_id="Europe/Berlin", viewport={"width": 1280, "height": 900}
        )
        opened = context.new_page()
        opened.errors = []
        opened.requested = []
        opened.on("pageerror", lambda error: opened.errors.append(str(error)))
        opened.on(
            "console",
            lambda entry: opened.errors.append(entry.text) if entry.type == "error" else None,
        )
        opened.on("request", lambda request: opened.requested.append(request.url))
        try:
            yield opened
        finally:
            browser.close()


def seed_history(on: Site, user_id: int, account_ids: list[int]) -> None:
    """Finished fetches on the last six days, as the job records would hold them."""
    now = utcnow()
    with on.sessions.begin() as session:
        for days, mails, seconds in HISTORY:
            job = jobs.create_job(
                session, user_id=user_id, account_ids=[], type=JobType.ALL, options={}
            )
            session.execute(
                update(PipelineJob)
                .where(PipelineJob.id == job.id)
                .values(
                    status="success",
                    created_at=now - timedelta(days=days),
                    finished_at=now - timedelta(days=days) + timedelta(seconds=seconds),
                    emails_fetched=mails,
                    metrics={"duration": seconds, "accounts": len(account_ids)},
                )
            )


def test_fetch_now_runs_a_job_to_the_end_in_the_page(site, worker, dovecot, server, page):  # noqa: F811
    # Given alice with two mailboxes on Dovecot, one account with a stale password, and history
    alice = site.user("alice")
    accounts = []
    for mails in (3, 2):
        login, password = dovecot.new_user()
        dovecot.append(login, password, [message(i) for i in range(mails)])
        accounts.append(
            site.account(
                alice, host=dovecot.host, port=dovecot.port, login=login, password=password
            )
        )
    stale_login, _password = dovecot.new_user()
    accounts.append(
        site.account(
            alice, host=dovecot.host, port=dovecot.port, login=stale_login, password="outdated"
        )
    )
    seed_history(site, alice.id, accounts)
    site.notify(alice.id, "Willkommen: Ihre Konten werden ab jetzt regelmäßig abgerufen.")

    # When she logs in with background sync and presses "Jetzt abrufen"
    page.goto(f"{server}/login")
    page.get_by_label("Benutzername").fill("alice")
    page.get_by_label("Passwort").fill(PASSWORD)
    page.get_by_label("Hintergrundabruf erlauben").check()
    page.get_by_role("button", name="Anmelden").click()
    expect(page.get_by_role("heading", name="Letzte Abrufe")).to_be_visible()
    page.get_by_role("button", name="Jetzt abrufen").click()

    # Then the live progress follows the job to its end, in German
    progress = page.locator("#progress")
    expect(progress).to_have_attribute("data-final", "true", timeout=JOB_SECONDS * 1000)
    expect(progress).to_have_attribute("data-status", "partial_failure")
    expect(page.locator("#progress-title")).to_have_text("Teilweise fehlgeschlagen")
    expect(page.locator("#progress-count")).to_have_text("3 von 3 Konten fertig")
    expect(page.locator("#progress-accounts li")).to_have_count(3)
    expect(page.locator("#progress-accounts")).to_contain_text(
        "Anmeldung fehlgeschlagen, bitte das Passwort neu eingeben."
    )
    # And the refreshed sections show the job first, the broken account and the 7-day chart
    newest = page.locator("#jobs tbody tr").first
    expect(newest).to_have_attribute("data-status", "partial_failure")
    expect(newest).to_contain_text("alle")
    expect(newest.locator("td").nth(4)).to_have_text("5")
    expect(page.locator("#jobs tbody tr")).to_have_count(len(HISTORY) + 1)
    broken = page.locator(f'article.account[data-account="{accounts[2]}"]')
    expect(broken.locator(".badge")).to_have_text("Gestört")
    expect(broken).to_contain_text("Anmeldung fehlgeschlagen, bitte das Passwort neu eingeben.")
    expect(page.locator("article.account.health-healthy")).to_have_count(2)
    expect(page.locator("#trend-chart rect.bar-mails")).to_have_count(7)
    expect(page.locator("#trend-chart circle.dot-duration")).to_have_count(7)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-de.png"), full_page=True)

    # And the connection check of a healthy account, run by the worker, answers in the card
    healthy = page.locator(f'article.account[data-account="{accounts[0]}"]')
    healthy.get_by_role("button", name="Verbindung prüfen").click()
    check = healthy.locator(".check-result")
    expect(check).to_have_attribute("data-status", "done", timeout=JOB_SECONDS * 1000)
    expect(check).to_contain_text("Verbindung in Ordnung")
    # And the check of the account with the stale password says what to do
    broken.get_by_role("button", name="Verbindung prüfen").click()
    expect(broken.locator(".check-result")).to_have_attribute(
        "data-status", "done", timeout=JOB_SECONDS * 1000
    )
    expect(broken.locator(".check-result")).to_contain_text(
        "Prüfung fehlgeschlagen: Anmeldung fehlgeschlagen, bitte das Passwort neu eingeben."
    )

    # And the card says how mail is fetched, and push goes off and on again with its button
    expect(healthy.locator(".fetch-mode")).to_have_text("Abruf alle 5 min")
    healthy.get_by_role("button", name="Push ausschalten").click()
    expect(healthy.get_by_role("button", name="Push einschalten")).to_be_visible()
    with site.sessions() as session:
        assert session.get_one(MailAccount, accounts[0]).push_enabled is False
    healthy.get_by_role("button", name="Push einschalten").click()
    expect(healthy.get_by_role("button", name="Push ausschalten")).to_be_visible()

    # And the page speaks English on request
    page.goto(f"{server}/?lang=en")
    expect(page.get_by_role("button", name="Fetch now")).to_be_visible()
    expect(page.locator("#jobs tbody tr").first).to_contain_text("Partly failed")
    page.screenshot(path=str(ARTIFACTS / "dashboard-en.png"), full_page=True)

    # And nothing broke in the page, and nothing was loaded from anywhere but the app
    assert page.errors == []
    assert all(url.startswith(server) for url in page.requested), page.requested
