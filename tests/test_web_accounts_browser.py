"""Accounts on the page in headless Chromium: add one by password, see it break when the
provider's password changes, enter the new password on its card and see it healthy again."""

from __future__ import annotations

import time

from playwright.sync_api import expect

from tests.test_sync import message
from tests.test_web_api import PASSWORD, site, worker  # noqa: F401  (fixtures)
from tests.test_web_browser import JOB_SECONDS, page, pytestmark, server  # noqa: F401


def test_add_an_account_break_it_and_fix_the_password_on_the_page(
    site,  # noqa: F811
    worker,  # noqa: F811
    dovecot,
    server,  # noqa: F811
    page,  # noqa: F811
):
    # Given anna, logged in with background sync, and a mailbox on Dovecot with two messages
    site.user("anna")
    login, password = dovecot.new_user()
    dovecot.append(login, password, [message(1), message(2)])
    page.goto(f"{server}/login")
    page.get_by_label("Benutzername").fill("anna")
    page.get_by_label("Passwort").fill(PASSWORD)
    page.get_by_label("Hintergrundabruf erlauben").check()
    page.get_by_role("button", name="Anmelden").click()
    expect(page.get_by_text("Noch keine Konten eingerichtet.")).to_be_visible()

    # When she opens "Konto hinzufügen" (closed until asked for) and picks GMX
    form = page.locator("#add-account-form")
    expect(form).to_be_hidden()
    page.get_by_role("button", name="Konto hinzufügen").click()
    form.get_by_label("Anbieter").select_option(label="GMX")
    # Then the preset fills the server, port and encryption
    expect(form.get_by_label("Server")).to_have_value("imap.gmx.net")
    expect(form.get_by_label("Port")).to_have_value("993")

    # When she enters her own server by hand, with a mistyped password
    form.get_by_label("Anbieter").select_option(value="")
    form.get_by_label("Server").fill(dovecot.host)
    form.get_by_label("Port").fill(str(dovecot.port))
    form.get_by_label("Verschlüsselung").select_option(value="none")
    form.get_by_label("Benutzername").fill(login)
    form.get_by_label("Passwort").fill("vertippt")
    form.get_by_role("button", name="Speichern").click()
    # Then the form says why, in German, and no account appears
    expect(form.locator(".form-message")).to_have_text(
        "Anmeldung fehlgeschlagen, bitte das Passwort neu eingeben."
    )
    expect(page.locator("article.account")).to_have_count(0)

    # When she corrects the password
    form.get_by_label("Passwort").fill(password)
    form.get_by_role("button", name="Speichern").click()
    # Then the account is stored and shown as a card
    card = page.locator("article.account")
    expect(card).to_have_count(1)
    expect(card).to_contain_text(login)
    # And its password form stays closed while nothing asks for it
    expect(card.locator(".password-form")).to_be_hidden()

    # When the provider's password changes and a fetch runs
    new_password = password + "-neu"
    dovecot.add_user(login, new_password)
    time.sleep(1.1)  # Dovecot re-reads a passwd-file at most once a second
    page.get_by_role("button", name="Jetzt abrufen").click()
    progress = page.locator("#progress")
    expect(progress).to_have_attribute("data-final", "true", timeout=JOB_SECONDS * 1000)
    page.reload()
    # Then the card is BROKEN and offers the new password at once
    card = page.locator("article.account")
    expect(card.locator(".badge")).to_have_text("Gestört")
    password_form = card.locator(".password-form")
    expect(password_form).to_be_visible()

    # When she enters the new password on the card
    password_form.get_by_label("Neues Passwort").fill(new_password)
    password_form.get_by_role("button", name="Speichern").click()
    # Then, the login checked, the account is healthy again
    expect(page.locator("article.account .badge")).not_to_have_text("Gestört")
    expect(page.locator("article.account.health-healthy")).to_have_count(1)

    # When she opens "Ordner und Intervall ändern" (closed until asked for) on the card, names
    # a second folder and fetches every 15 minutes
    card = page.locator("article.account")
    expect(card.locator(".folders")).to_have_text("INBOX")
    settings = card.locator(".settings-form")
    expect(settings).to_be_hidden()
    card.get_by_role("button", name="Ordner und Intervall ändern").click()
    expect(settings.get_by_label("Abruf alle … Sekunden")).to_have_value("300")
    settings.get_by_label("Ordner (durch Komma getrennt)").fill("INBOX, Archiv")
    settings.get_by_label("Abruf alle … Sekunden").fill("900")
    settings.get_by_role("button", name="Speichern").click()
    # Then the card shows both folders (stored sealed, read back with her key) and the interval
    expect(card.locator(".folders")).to_have_text("INBOX, Archiv")
    expect(card.locator(".fetch-mode")).to_have_text("Abruf alle 15 min")

    # When she removes it, confirming the question
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("article.account").get_by_role("button", name="Entfernen").click()
    # Then it is gone from the page
    expect(page.locator("article.account")).to_have_count(0)
    # And the only error the browser noted is the refused login's answer, 422
    assert [error for error in page.errors if "status of 422" not in error] == []
    assert len(page.errors) == 1
