"""The dashboard in headless Chromium: log in, press "Jetzt abrufen", watch the job finish,
then check two accounts' connections.

The app runs on a real HTTP server on loopback; an in-process Dramatiq worker runs the job
against the real Dovecot, as in tests/test_pipeline.py. Screenshots go to artifacts/.
"""

from __future__ import annotations

import re
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


PHONE = {"width": 390, "height": 844}
WIDER_THAN = """(limit) => [...document.querySelectorAll("body *")]
    .filter((element) => element.getBoundingClientRect().right > limit + 0.5)
    .map((element) => `${element.tagName}.${element.className}`)"""


def record_runs(on: Site, account_id: int, statuses: list[str]) -> None:
    """Finished runs of one account, oldest first, as jobs of one account each."""
    with on.sessions.begin() as session:
        for status in statuses:
            job = jobs.create_job(
                session,
                user_id=on_user(session, account_id),
                account_ids=[account_id],
                type=JobType.ACCOUNT,
                options={},
            )
            failed = status == "failed"
            jobs.finish_run(
                session,
                job_id=job.id,
                account_id=account_id,
                status=status,
                error_class="timeout" if failed else None,
                message="server did not answer in time" if failed else None,
            )


def on_user(session, account_id: int) -> int:
    return session.get_one(MailAccount, account_id).user_id


def test_the_dashboard_fits_a_phone(site, server, page):  # noqa: F811
    # Given alice with two accounts, one never fetched and one with 2 failures in 3 attempts,
    # a week of history and a fetch that found no account at all
    alice = site.user("alice")
    never = site.account(alice, login="ben")
    shaky = site.account(alice, login="clara.mustermann-mit-langem-namen@example.de")
    seed_history(site, alice.id, [never, shaky])
    record_runs(site, shaky, ["failed", "success", "failed"])
    with site.sessions.begin() as session:
        jobs.create_job(session, user_id=alice.id, account_ids=[], type=JobType.ALL, options={})
    site.notify(alice.id, "Willkommen: Ihre Konten werden ab jetzt regelmäßig abgerufen.")

    # When she logs in on a phone 390 px wide
    page.set_viewport_size(PHONE)
    page.goto(f"{server}/login")
    page.get_by_label("Benutzername").fill("alice")
    page.get_by_label("Passwort").fill(PASSWORD)
    page.get_by_role("button", name="Anmelden").click()
    expect(page.get_by_role("heading", name="Letzte Abrufe")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-390.png"), full_page=True)

    # Then the page is no wider than the phone, and nothing in it sticks out
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.evaluate(WIDER_THAN, PHONE["width"]) == []
    header = page.locator("header.top").bounding_box()
    assert abs(header["width"] - PHONE["width"]) < 1
    # And the fetch that found no account says so, not "Erfolgreich"
    empty = page.locator("#jobs tbody tr").first
    expect(empty).to_have_attribute("data-status", "failed")
    expect(empty.locator(".reason")).to_have_text(
        "Keine Konten gefunden: bitte zuerst ein E-Mail-Konto einrichten."
    )
    # And times are relative ("gestern", "vor 2 Min."), the exact time in the title
    yesterday = page.locator("#jobs tbody tr").nth(4).locator("time")
    expect(yesterday).to_have_text("gestern")
    expect(yesterday).to_have_attribute("title", re.compile(r"\d"))
    # And the account never fetched says "nie"; the shaky one counts its recent failures
    never_card = page.locator(f'article.account[data-account="{never}"]')
    expect(never_card.locator("dd").nth(1)).to_have_text("nie")
    shaky_card = page.locator(f'article.account[data-account="{shaky}"]')
    expect(shaky_card.locator(".recent")).to_have_text("2 Fehler in den letzten 3 Versuchen")
    expect(page.locator(".totals")).to_contain_text(f"{len(HISTORY) + 4} Abrufe")

    # When she taps a job of the history
    page.locator("#jobs tbody tr").nth(1).locator(".job-detail").click()
    # Then its per-account outcome, error and phases show, still within the phone's width
    expect(page.locator("#progress")).to_be_visible()
    expect(page.locator("#progress-title")).to_contain_text("Abruf ")
    expect(page.locator("#progress-accounts li")).to_have_count(1)
    expect(page.locator("#progress-accounts")).to_contain_text(
        "Der Mailserver hat nicht rechtzeitig geantwortet."
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=str(ARTIFACTS / "dashboard-390-detail.png"), full_page=True)
    # And in English the third kind of account is not labelled in German
    page.goto(f"{server}/?lang=en")
    expect(page.locator(f'article.account[data-account="{never}"] h3')).to_have_text("Mail · ben")
    assert page.errors == []
