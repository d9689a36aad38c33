"""The whole "connect with ..." flow in headless Chromium against the local authorization
server: the page, the provider's consent (given at once), the callback, the account's card,
and a fetch over XOAUTH2 with the stored grant."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.test_oauth2 import oauth, oauth_module  # noqa: F401  (fixtures)
from tests.test_sync import message
from tests.test_web_api import PASSWORD, make_site, worker  # noqa: F401  (fixtures)
from tests.test_web_browser import JOB_SECONDS, page, pytestmark, server  # noqa: F401


@pytest.fixture
def site(tmp_path, oauth):  # noqa: F811
    _server, auth = oauth
    yield from make_site(tmp_path, oauth2_providers={"generic": auth.provider(_server)})


def test_connect_an_account_with_the_provider_and_fetch_its_mail(
    oauth,  # noqa: F811
    site,
    worker,  # noqa: F811
    server,  # noqa: F811
    page,  # noqa: F811
):
    # Given anna logged in with background sync, and a mailbox at the provider
    imap_server, auth = oauth
    imap_user, imap_password = imap_server.new_user()
    imap_server.append(imap_user, imap_password, [message(1), message(2)])
    site.user("anna")
    page.goto(f"{server}/login")
    page.get_by_label("Benutzername").fill("anna")
    page.get_by_label("Passwort").fill(PASSWORD)
    page.get_by_label("Hintergrundabruf erlauben").check()
    page.get_by_role("button", name="Anmelden").click()

    # When she opens "Konto hinzufügen", gives her address, presses "Mit … verbinden" and
    # declines at the provider
    auth.deny = True
    page.get_by_role("button", name="Konto hinzufügen").click()
    connect = page.locator("#connect-account-form")
    connect.get_by_label("E-Mail-Adresse beim Anbieter").fill(imap_user)
    connect.get_by_role("button", name="Mit Testanbieter verbinden").click()
    # Then she is back on the page, told so in German, and no account was added
    expect(connect.locator(".form-message")).to_have_text(
        "Die Verbindung wurde beim Anbieter abgebrochen oder abgelehnt."
    )
    expect(page.locator("article.account")).to_have_count(0)

    # When she tries again and agrees
    auth.deny = False
    connect.get_by_label("E-Mail-Adresse beim Anbieter").fill(imap_user)
    connect.get_by_role("button", name="Mit Testanbieter verbinden").click()

    # Then the provider (agreeing at once) sends her back, and the account is on the page
    card = page.locator("article.account")
    expect(card).to_have_count(1, timeout=JOB_SECONDS * 1000)
    expect(card).to_contain_text(imap_user)
    assert any("/authorize?" in url for url in page.requested)
    assert auth.codes == {}  # the code was redeemed, once

    # When she fetches
    page.get_by_role("button", name="Jetzt abrufen").click()
    progress = page.locator("#progress")
    expect(progress).to_have_attribute("data-final", "true", timeout=JOB_SECONDS * 1000)
    # Then both mails came over XOAUTH2 with the stored grant
    expect(progress).to_have_attribute("data-status", "success")
    assert f"Login: user=<{imap_user}>, method=XOAUTH2" in imap_server.log_path.read_text()
    assert page.errors == []
