// Accounts on the dashboard: add one (a preset fills the server), change a password or the
// folders and interval, remove one.
// Every change goes through the JSON API, which checks a new login before it stores it.
"use strict";

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const page = JSON.parse(document.getElementById("page-data").textContent);
  const t = page.texts;

  async function send(method, path, body) {
    const url = `${path}${path.includes("?") ? "&" : "?"}lang=${encodeURIComponent(page.lang)}`;
    const response = await fetch(url, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let answer = null;
    try {
      answer = await response.json();
    } catch (error) {
      answer = null; // 204 has no body
    }
    return { ok: response.ok, answer };
  }

  function say(form, words) {
    form.querySelector(".form-message").textContent = words;
  }

  async function submitting(form, method, path, body, pending = t.checking_login) {
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    say(form, pending);
    try {
      const result = await send(method, path, body);
      if (result.ok) {
        say(form, t.account_saved);
        window.location.reload();
        return;
      }
      say(form, (result.answer && result.answer.error) || t.error_generic);
    } catch (error) {
      say(form, t.error_generic);
    } finally {
      button.disabled = false;
    }
  }

  function folderList(input) {
    // "INBOX, Archiv" as the API takes it; nothing named means INBOX
    const folders = input.value.split(",").map((f) => f.trim()).filter(Boolean);
    return folders.length ? folders : ["INBOX"];
  }

  function opens(buttons, forms) {
    // a card's button opens and closes the form of the same account
    for (const button of document.querySelectorAll(buttons)) {
      button.addEventListener("click", () => {
        const form = document.querySelector(`${forms}[data-account="${button.dataset.account}"]`);
        form.hidden = !form.hidden;
      });
    }
  }

  const addForm = document.getElementById("add-account-form");
  const connectForm = document.getElementById("connect-account-form");
  const toggle = document.getElementById("add-account-toggle");
  let connecting = false;

  async function connect(provider) {
    // "Mit Google verbinden": the API seals state and PKCE verifier in a cookie and names the
    // provider's page; the provider sends the browser back to the API, then to this page
    if (!connectForm.reportValidity()) return;
    const result = await send("POST", `/api/oauth2/${provider}/start`, {
      login: connectForm.elements.login.value.trim(),
    });
    if (result.ok) {
      window.location.assign(result.answer.authorization_url);
    } else {
      say(connectForm, (result.answer && result.answer.error) || t.error_generic);
    }
  }

  if (addForm && toggle) {
    toggle.addEventListener("click", () => {
      addForm.hidden = !addForm.hidden;
      connectForm.hidden = addForm.hidden || !connecting;
    });
    const presets = {};
    send("GET", "/api/accounts/presets").then(({ ok, answer }) => {
      if (!ok) return;
      for (const preset of answer.presets) {
        presets[preset.id] = preset;
        addForm.elements.preset.add(new Option(preset.name, preset.id));
      }
      const buttons = connectForm.querySelector(".connect-buttons");
      for (const provider of answer.oauth2) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "primary";
        button.textContent = t.connect_with.replace("{provider}", provider.display);
        button.addEventListener("click", () => connect(provider.name));
        buttons.append(button);
      }
      connecting = answer.oauth2.length > 0;
      connectForm.hidden = addForm.hidden || !connecting;
    });
    addForm.elements.preset.addEventListener("change", () => {
      const preset = presets[addForm.elements.preset.value];
      if (!preset) return;
      addForm.elements.host.value = preset.host;
      addForm.elements.port.value = preset.port;
      addForm.elements.security.value = preset.security;
    });
    addForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const fields = addForm.elements;
      submitting(addForm, "POST", "/api/accounts", {
        host: fields.host.value.trim(),
        port: Number(fields.port.value),
        security: fields.security.value,
        login: fields.login.value.trim(),
        password: fields.password.value,
        folders: folderList(fields.folders),
        interval: Number(fields.interval.value),
      });
    });
  }

  opens(".change-password", ".password-form");
  for (const form of document.querySelectorAll(".password-form")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submitting(form, "PATCH", `/api/accounts/${form.dataset.account}`, {
        password: form.elements.password.value,
      });
    });
  }
  opens(".change-settings", ".settings-form");
  for (const form of document.querySelectorAll(".settings-form")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submitting(
        form,
        "PATCH",
        `/api/accounts/${form.dataset.account}`,
        { folders: folderList(form.elements.folders), interval: Number(form.elements.interval.value) },
        t.saving,
      );
    });
  }
  // back from the provider without an account: the API names the reason's text in the fragment
  const failed = /^#oauth2-error=([a-z0-9_]+)$/.exec(window.location.hash);
  if (failed && connectForm) {
    addForm.hidden = false;
    connectForm.hidden = false;
    say(connectForm, t[failed[1]] || t.error_generic);
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  for (const button of document.querySelectorAll(".reconnect-account")) {
    button.addEventListener("click", () => {
      addForm.hidden = false;
      connectForm.hidden = !connecting;
      connectForm.scrollIntoView();
    });
  }
  for (const button of document.querySelectorAll(".remove-account")) {
    button.addEventListener("click", async () => {
      if (!window.confirm(t.remove_confirm)) return;
      const result = await send("DELETE", `/api/accounts/${button.dataset.account}`);
      if (result.ok) window.location.reload();
    });
  }
})();
