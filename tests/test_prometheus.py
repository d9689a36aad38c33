"""Prometheus, Alertmanager and Grafana files, checked by their own tools and by the real programs.

The static checks run promtool and amtool on the repository's files. The stack test runs one
fetch job through real `dramatiq` worker processes (Redis broker, PostgreSQL) over three real
Dovecot accounts (healthy, wrong password, connection refused), with PROMETHEUS_MULTIPROC_DIR set
before they start, serves what they wrote with the real exporter, and lets a real Prometheus
scrape it (the repository's prometheus.yml with targets on this test's ports): every query of
every dashboard panel must return a series (0, not "No data"), the recording rules must
evaluate, and an alert must travel through a real Alertmanager (the repository's
alertmanager.yml) into the web app's webhook, which stores it as an operator notification. A
second real Alertmanager runs alertmanager.yml with its optional e-mail blocks uncommented and
mails critical alerts to a local SMTP server (aiosmtpd).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path

import dramatiq
import pytest
import yaml
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select
from werkzeug.serving import make_server

from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import Notification
from metrics import multiprocess
from tests.support.cluster import running_cluster
from tests.support.dovecot import free_ports
from tests.support.workers import REDIS_URL, ROOT

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
MISSING = (
    "is missing: `make test` installs the Debian packages prometheus and prometheus-alertmanager"
)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool {MISSING}")
needs_amtool = pytest.mark.skipif(AMTOOL is None, reason=f"amtool {MISSING}")
needs_servers = pytest.mark.skipif(
    PROMETHEUS is None or ALERTMANAGER is None, reason=f"prometheus or alertmanager {MISSING}"
)

RULES = ROOT / "prometheus" / "rules"
ALERT_RULES = RULES / "mailpipe-alerts.yml"
RULE_TESTS = ROOT / "prometheus" / "tests"
DASHBOARDS = ROOT / "grafana" / "dashboards"
RUNBOOK = ROOT / "docs" / "runbook.md"
FAST_KDF = 1_000
PROVIDER = "gmx"
# What Grafana puts in place of its variables when it sends a query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$provider": PROVIDER,
}
STARTUP_SECONDS = 30
ALERT_SECONDS = 40
EMAIL_START, EMAIL_END = "# >>> e-mail", "# <<< e-mail"
EMAIL_RECEIVER = "operators-email"
INHIBITED_BY_WORKER_DOWN = (
    "MailpipeQueueBacklogGrowing",
    "MailpipeQueueStalled",
    "MailpipeSyncStale",
)


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def alert_rules() -> list[dict]:
    return [
        rule
        for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(board: dict) -> Iterator[dict]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def grafana_expr(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr.replace("$1", ""), f"unsubstituted variable in {expr}"
    return expr


# -- static checks -------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_config_and_its_rule_files(tmp_path):
    # Given prometheus.yml with its secrets where they are in the container (here, temp files:
    # promtool wants every credentials file to exist)
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    secrets = [job["authorization"] for job in config["scrape_configs"] if "authorization" in job]
    assert [s["credentials_file"] for s in secrets] == ["/run/secrets/web_metrics_token"]
    for secret in secrets:
        secret["credentials_file"] = str(tmp_path / "web_metrics_token")
        Path(secret["credentials_file"]).write_text("token")
    config["rule_files"] = [str(ROOT / pattern) for pattern in config["rule_files"]]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    # When promtool checks it, Then it and its rule files pass
    result = promtool("check", "config", str(checked))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


@needs_promtool
def test_promtool_accepts_every_rule_file():
    result = promtool("check", "rules", *map(str, sorted(RULES.glob("*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", *map(str, sorted(RULE_TESTS.glob("*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_amtool
def test_amtool_accepts_the_alertmanager_config():
    result = subprocess.run(
        [AMTOOL, "check-config", "alertmanager.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 inhibit rules" in result.stdout


@needs_amtool
def test_amtool_accepts_the_config_with_its_email_blocks_uncommented(tmp_path: Path):
    # Given alertmanager.yml with the optional e-mail route and receiver switched on as its
    # header says (the shipped file has them commented out)
    variant = tmp_path / "alertmanager.yml"
    variant.write_text(with_email((ROOT / "alertmanager.yml").read_text()))

    # When amtool checks it, then it is valid and has the second receiver
    result = subprocess.run(
        [AMTOOL, "check-config", str(variant)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 receivers" in result.stdout
    config = yaml.safe_load(variant.read_text())
    [email_route] = [r for r in config["route"]["routes"] if r["receiver"] == EMAIL_RECEIVER]
    assert (email_route["matchers"], email_route["continue"]) == (['severity="critical"'], True)


def test_every_alert_is_described_and_links_to_its_runbook_section():
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert (page, anchor) == ("docs/runbook.md", rule["alert"].lower())
        assert anchor in anchors, f"docs/runbook.md has no section for {rule['alert']}"


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_silent():
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS.glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set()
    assert names - silent == set()


def test_the_generator_reproduces_the_committed_dashboards():
    result = subprocess.run(
        [sys.executable, "grafana/build.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(dashboards()) == {"mailpipe-health.json", "mailpipe-performance.json"}


def test_dashboards_have_units_the_provider_variable_and_link_to_each_other():
    boards = {board["uid"]: board for board in dashboards().values()}
    provisioned = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    datasource_uid = provisioned["datasources"][0]["uid"]
    assert {b["title"] for b in boards.values()} == {"Mailpipe / Performance", "Mailpipe / Health"}
    for uid, board in boards.items():
        [variable] = board["templating"]["list"]
        assert (variable["name"], variable["includeAll"]) == ("provider", True)
        links = {link["url"] for link in board["links"]}
        assert links == {f"/d/{other}" for other in boards if other != uid}
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids))
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
            assert panel["datasource"]["uid"] == datasource_uid
            assert panel["targets"], panel["title"]


# -- the real stack ------------------------------------------------------------------------


@dataclass
class Planted:
    """Names a label must never carry: they all take part in the synced run."""

    user: str = "planted-user-7f3a"
    address: str = "planted.address@example.org"
    folder: str = "PlantedFolder"
    logins: list[str] = field(default_factory=list)

    def words(self) -> list[str]:
        return [self.user, self.address, self.folder, *self.logins]


def mail(i: int, planted: Planted) -> bytes:
    return (
        f"From: Planted <{planted.address}>\r\nTo: {planted.address}\r\n"
        f"Subject: Nachricht {i}\r\nMessage-ID: <p{i}@example.org>\r\n\r\nInhalt {i}\r\n"
    ).encode()


@pytest.fixture(scope="module")
def planted() -> Planted:
    return Planted()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("observability")


@dataclass
class Run:
    """A finished job of real worker processes, their metrics directory and their namespace."""

    env: dict[str, str]
    namespace: str
    job: dict


@pytest.fixture(scope="module")
def synced(dovecot, workdir: Path, planted: Planted) -> Iterator[Run]:
    """Real `dramatiq` worker processes ran one job over three accounts: one good, one with a
    wrong password, one whose server refuses connections; then they stopped.

    Nothing is planted in their metrics: what the dashboards show is what such a run leaves.
    """
    metrics_dir = workdir / "metrics"
    extra = {
        multiprocess.DIRECTORY_ENV: str(metrics_dir),
        multiprocess.DRAMATIQ_ENV: str(metrics_dir),
        "MAILPIPE_MAX_RETRIES": "1",
    }
    multiprocess.prepare(dict(extra))  # an empty directory, as `mailpipe worker` leaves it
    good, good_password = dovecot.new_user()
    bad, _ = dovecot.new_user()
    planted.logins += [good, bad]
    dovecot.append(good, good_password, [mail(i, planted) for i in range(3)])
    dovecot.append(good, good_password, [b"no header block\r\n\r\nbody\r\n"])
    dovecot.append(good, good_password, [mail(i, planted) for i in (3, 4)], folder=planted.folder)
    [refused_port] = free_ports(1)
    with running_cluster(dovecot, workdir, extra_env=extra) as cluster:
        with cluster.sessions.begin() as session:
            user, key = create_user(session, planted.user, "pw", iterations=FAST_KDF)
            user_id = user.id
            for login, password, port in (
                (good, good_password, dovecot.port),
                (bad, "wrong password", dovecot.port),
                (good, good_password, refused_port),
            ):
                imap = ImapSettings(
                    host=dovecot.host, port=port, username=login, password=password, security="none"
                )
                add_account(
                    session, user, key, imap, folders=["INBOX", planted.folder], provider=PROVIDER
                )
        job_id = cluster.pipeline.enqueue_fetch_job(
            user_id, key=key, max_mails=None, timeout_seconds=30
        )
        job = cluster.wait(job_id, user_id)
        cluster.workers.stop()
        assert job["status"] == "partial_failure", job
        yield Run(env=cluster.env, namespace=cluster.namespace, job=job)


@pytest.fixture(scope="module")
def queued(synced: Run) -> None:
    """After the run, with its workers gone: two ready fetch messages, one delayed, one
    dead-lettered, in the run's Redis namespace (what the queue alerts look at)."""
    broker = RedisBroker(url=REDIS_URL, namespace=synced.namespace, middleware=[])

    @dramatiq.actor(broker=broker, queue_name="fetch")
    def fetch_account(job_id: str, account_id: int) -> None: ...

    for account_id in (1, 2, 3):
        broker.enqueue(fetch_account.message("job", account_id))
    broker.enqueue(fetch_account.message("job", 4), delay=600_000)
    consumer = broker.consume("fetch", prefetch=1, timeout=1000)
    consumer.nack(next(consumer))
    consumer.close()
    broker.close()


class Server:
    """A program started by the test, stopped (only it) at the end."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, log: Path) -> None:
        self.log = log
        self.handle = open(log, "wb")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self.handle, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.handle.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def wait_for(check: Callable[[], object], *, seconds: float, what: str, server=None) -> object:
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{server.tail() if server else ''}")
        time.sleep(0.25)


class Webhook:
    """mailpipe's real web app as Alertmanager's receiver, recording each POST on its way in."""

    def __init__(self, workdir: Path, *, token: str) -> None:
        from mailpipe.settings import Settings
        from web.app import create_app

        self.posts: list[dict] = []
        app = create_app(
            Settings(
                database_url=f"sqlite:///{workdir / 'web.db'}",
                data_dir=workdir,
                alert_token=token,
            )
        )
        self.sessions = app.extensions["mailpipe"].sessions

        def recording(environ: dict, start_response: Callable) -> object:
            if environ["REQUEST_METHOD"] == "POST":
                body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                self.posts.append(
                    {
                        "path": environ["PATH_INFO"],
                        "authorization": environ.get("HTTP_AUTHORIZATION"),
                        "payload": json.loads(body),
                    }
                )
                environ["wsgi.input"] = io.BytesIO(body)
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, recording, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts(self, name: str) -> list[dict]:
        return [p for p in self.posts if p["payload"]["commonLabels"].get("alertname") == name]

    def stored(self) -> list[Notification]:
        """The operator notifications the web app wrote."""
        with self.sessions() as session:
            return list(session.scalars(select(Notification).where(Notification.user_id.is_(None))))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    exporter_url: str
    prometheus_url: str
    alertmanager_url: str
    webhook: Webhook
    token: str
    servers: dict[str, Server]
    email_alertmanager_url: str
    smtp: SmtpSink

    def query(self, expr: str) -> list[dict]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = json.loads(http_get(url))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]


def prometheus_config(
    workdir: Path,
    *,
    exporter: int,
    dead_worker: int,
    web: int,
    alertmanager: int,
    prom: int,
    email_alertmanager: int,
    token_file: Path,
) -> Path:
    """prometheus.yml with this test's ports, a 1 s rhythm, and alerts that need no waiting."""
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    targets = {
        "mailpipe-worker": [f"127.0.0.1:{exporter}", f"127.0.0.1:{dead_worker}"],
        "mailpipe-web": [f"127.0.0.1:{web}"],
        # no watcher runs here: the exporter stands in, as it serves the same push metrics
        "mailpipe-watcher": [f"127.0.0.1:{exporter}"],
        "alertmanager": [f"127.0.0.1:{alertmanager}"],
        "prometheus": [f"127.0.0.1:{prom}"],
    }
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets.pop(job["job_name"])}]
        if "authorization" in job:  # the secret lives in /run/secrets in the container
            job["authorization"]["credentials_file"] = str(token_file)
    assert targets == {}, f"prometheus.yml lacks the jobs {sorted(targets)}"
    [alerting] = config["alerting"]["alertmanagers"]
    # Alerts go to both: the shipped configuration, and the one with its e-mail blocks on.
    alerting["static_configs"] = [
        {"targets": [f"127.0.0.1:{alertmanager}", f"127.0.0.1:{email_alertmanager}"]}
    ]
    alerts = yaml.safe_load(ALERT_RULES.read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            # The fault is already there: no need to wait minutes for it. Alerts that a worker
            # going down causes keep a short wait, as in production their cause fires first
            # (2 m against 10 m or more), so the inhibition is in place before they arrive.
            rule["for"] = "5s" if rule.get("alert") in INHIBITED_BY_WORKER_DOWN else "0s"
    variant = workdir / "alerts-now.yml"
    variant.write_text(yaml.safe_dump(alerts))
    config["rule_files"] = [str(RULES / "mailpipe-recording.yml"), str(variant)]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def with_email(text: str) -> str:
    """alertmanager.yml with its e-mail blocks uncommented, as its header tells users to."""
    lines, inside, found = [], False, 0
    for line in text.splitlines():
        marker = line.strip()
        if marker in (EMAIL_START, EMAIL_END):
            inside = marker == EMAIL_START
            found += inside
            continue
        if inside:
            indent = line[: len(line) - len(line.lstrip())]
            assert line.lstrip().startswith("# "), line
            line = indent + line.lstrip()[2:]
        lines.append(line)
    assert found == 2, "alertmanager.yml should have an e-mail route and an e-mail receiver"
    return "\n".join(lines) + "\n"


def alertmanager_config(
    workdir: Path,
    *,
    webhook: int,
    token_file: Path,
    smtp: int | None = None,
    name: str = "alertmanager.yml",
) -> Path:
    """alertmanager.yml with the webhook on this test's port, its token file, short waits; with
    `smtp`, its e-mail blocks uncommented and the smarthost on that port (plain SMTP)."""
    text = (ROOT / "alertmanager.yml").read_text()
    config = yaml.safe_load(with_email(text) if smtp else text)
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        route["group_wait"] = "1s"
        route["group_interval"] = "1s"
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    [hook] = receivers.pop("mailpipe-web")["webhook_configs"]
    url = urllib.parse.urlsplit(hook["url"])
    hook["url"] = f"http://127.0.0.1:{webhook}{url.path}"
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    if smtp:
        [mail] = receivers.pop(EMAIL_RECEIVER)["email_configs"]
        mail.update(smarthost=f"127.0.0.1:{smtp}", require_tls=False)
    assert receivers == {}
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return path


class SmtpSink:
    """A local SMTP server (aiosmtpd) that keeps every message it is given."""

    def __init__(self, port: int) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[tuple[str, list[str], EmailMessage]] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd calls it so
        parsed = message_from_bytes(envelope.content, policy=email_policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"

    def about(self, alertname: str) -> list[tuple[str, list[str], EmailMessage]]:
        return [m for m in self.messages if alertname in str(m[2]["Subject"])]

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture(scope="module")
def stack(workdir: Path, synced: Run, queued: None) -> Iterator[Stack]:
    if PROMETHEUS is None or ALERTMANAGER is None:
        pytest.skip(f"prometheus or alertmanager {MISSING}")
    exporter_port, dead_worker, web, am_port, email_am_port, smtp_port, prom_port = free_ports(7)
    token = "test-token-" + os.urandom(8).hex()
    token_file = workdir / "webhook-token"
    token_file.write_text(token)
    webhook = Webhook(workdir, token=token)
    smtp = SmtpSink(smtp_port)
    servers: dict[str, Server] = {}
    try:
        servers["exporter"] = Server(
            [
                sys.executable,
                "-m",
                "metrics.exporter",
                "--host=127.0.0.1",
                f"--port={exporter_port}",
            ],
            env=synced.env,
            log=workdir / "exporter.log",
        )
        exporter_url = f"http://127.0.0.1:{exporter_port}/metrics"
        wait_for(
            lambda: http_get(exporter_url),
            seconds=STARTUP_SECONDS,
            what="the exporter",
            server=servers["exporter"],
        )
        am_config = alertmanager_config(workdir, webhook=webhook.port, token_file=token_file)
        servers["alertmanager"] = Server(
            [
                ALERTMANAGER,
                f"--config.file={am_config}",
                f"--storage.path={workdir / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            log=workdir / "alertmanager.log",
        )
        # The e-mail variant delivers its webhook nowhere (a port nobody listens on): the
        # webhook tests read the shipped configuration's deliveries only.
        email_config = alertmanager_config(
            workdir,
            webhook=dead_worker,
            token_file=token_file,
            smtp=smtp_port,
            name="alertmanager-email.yml",
        )
        servers["email-alertmanager"] = Server(
            [
                ALERTMANAGER,
                f"--config.file={email_config}",
                f"--storage.path={workdir / 'alertmanager-email'}",
                f"--web.listen-address=127.0.0.1:{email_am_port}",
                "--cluster.listen-address=",
            ],
            log=workdir / "alertmanager-email.log",
        )
        prom_config = prometheus_config(
            workdir,
            exporter=exporter_port,
            dead_worker=dead_worker,
            web=web,
            alertmanager=am_port,
            prom=prom_port,
            email_alertmanager=email_am_port,
            token_file=token_file,
        )
        servers["prometheus"] = Server(
            [
                PROMETHEUS,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            log=workdir / "prometheus.log",
        )
        built = Stack(
            exporter_url=exporter_url,
            prometheus_url=f"http://127.0.0.1:{prom_port}",
            alertmanager_url=f"http://127.0.0.1:{am_port}",
            webhook=webhook,
            token=token,
            servers=servers,
            email_alertmanager_url=f"http://127.0.0.1:{email_am_port}",
            smtp=smtp,
        )
        wait_for(
            lambda: http_get(f"{built.alertmanager_url}/-/ready"),
            seconds=STARTUP_SECONDS,
            what="Alertmanager",
            server=servers["alertmanager"],
        )
        wait_for(
            lambda: http_get(f"{built.email_alertmanager_url}/-/ready"),
            seconds=STARTUP_SECONDS,
            what="the e-mail Alertmanager",
            server=servers["email-alertmanager"],
        )
        scraped = f'count_over_time(up{{instance="127.0.0.1:{exporter_port}"}}[1m]) >= 3'
        wait_for(
            lambda: built.query(scraped),
            seconds=STARTUP_SECONDS,
            what="three scrapes of the exporter",
            server=servers["prometheus"],
        )
        yield built
    finally:
        for server in servers.values():
            server.stop()
        webhook.stop()
        smtp.stop()


def test_the_exporter_serves_the_run_without_a_name_in_any_label(stack: Stack, planted: Planted):
    # Given the exporter over the directory of a real worker run with planted names
    text = http_get(stack.exporter_url).decode()

    # Then the run's metrics are there, by provider, and no planted name is
    assert 'mailpipe_account_runs_total{outcome="success",provider="gmx"} 1.0' in text
    assert 'mailpipe_account_runs_total{outcome="failed",provider="gmx"} 2.0' in text
    assert 'mailpipe_emails_fetched_total{provider="gmx"} 6.0' in text
    assert 'mailpipe_emails_quarantined_total{reason="not_a_message"} 1.0' in text
    assert (
        'mailpipe_errors_total{error_class="invalid_credentials",phase="connect",provider="gmx"}'
        in text
    )
    assert 'mailpipe_retries_total{error_class="temporarily_unavailable"} 1.0' in text
    assert 'mailpipe_jobs_total{status="partial_failure",type="all"} 1.0' in text
    assert 'mailpipe_queue_messages{queue="fetch",state="dead"} 1.0' in text
    # And Dramatiq's counters exist at zero for every actor before anything was dead-lettered
    for counter in ("rejects", "errors", "retries"):
        sample = (
            f'dramatiq_message_{counter}_total{{actor_name="fetch_exhausted",queue_name="fetch"}}'
        )
        assert f"{sample} 0.0" in text, counter
    assert (
        'dramatiq_message_rejects_total{actor_name="fetch_account",queue_name="fetch"} 0.0' in text
    )
    for word in planted.words():
        assert word.lower() not in text.lower(), word


def test_every_dashboard_query_returns_a_series(stack: Stack):
    # Given every query of every panel, with Grafana's variables filled in as Grafana would
    queries = [
        (name, panel["title"], grafana_expr(target["expr"]))
        for name, board in dashboards().items()
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]
    assert len(queries) >= 20

    # When Prometheus evaluates each, then each returns at least one series
    empty = [(name, title, expr) for name, title, expr in queries if not stack.query(expr)]
    assert empty == []


def test_the_provider_variable_lists_the_synced_provider(stack: Stack):
    for board in dashboards().values():
        [variable] = board["templating"]["list"]
        metric = re.fullmatch(r"label_values\((\w+), provider\)", variable["query"]).group(1)
        url = f"{stack.prometheus_url}/api/v1/label/provider/values?match[]={metric}"
        assert PROVIDER in json.loads(http_get(url))["data"]


def test_every_rule_evaluates_and_every_recording_rule_records_a_series(stack: Stack):
    # Given the rules Prometheus loaded from the repository
    def rules() -> list[dict]:
        answer = json.loads(http_get(f"{stack.prometheus_url}/api/v1/rules"))
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]

    # When each has been evaluated at least once
    def evaluated() -> list[dict]:
        now = rules()
        done = all(not r["lastEvaluation"].startswith("0001") for r in now)
        return now if done else []

    loaded = wait_for(evaluated, seconds=10, what="every rule to be evaluated")

    # Then none failed, and every recorded series exists
    assert [r["name"] for r in loaded if r["health"] != "ok"] == []
    recorded = {r["name"] for r in loaded if r["type"] == "recording"}
    assert len([r for r in loaded if r["type"] == "recording"]) == 12
    assert len([r for r in loaded if r["type"] == "alerting"]) == len(alert_rules())
    assert {name for name in recorded if not stack.query(name)} == set()


def test_a_dead_letter_alert_reaches_the_webhook_with_the_bearer_token(stack: Stack):
    # Given a dead-lettered fetch message in Redis, scraped by Prometheus

    # When the alert fires and Alertmanager delivers it
    wait_for(
        lambda: stack.webhook.alerts("MailpipeDeadLetters"),
        seconds=ALERT_SECONDS,
        what="MailpipeDeadLetters at the webhook",
        server=stack.servers["alertmanager"],
    )
    [post, *_] = stack.webhook.alerts("MailpipeDeadLetters")

    # Then it came to the web app's path with the token from the credentials file
    assert post["path"] == "/api/alerts/alertmanager"
    assert post["authorization"] == f"Bearer {stack.token}"
    payload = post["payload"]
    assert (payload["receiver"], payload["status"]) == ("mailpipe-web", "firing")
    assert payload["groupLabels"] == {"alertname": "MailpipeDeadLetters", "queue": "fetch"}
    [alert] = payload["alerts"]
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"] == {
        "summary": "Dead-lettered messages in queue fetch",
        "description": "1 messages of queue fetch failed every retry and were dead-lettered.",
        "runbook_url": "docs/runbook.md#mailpipedeadletters",
    }
    # And the web app stored it as an operator notification
    stored = [n for n in stack.webhook.stored() if "Dead-lettered" in n.message]
    assert stored, [n.message for n in stack.webhook.stored()]
    assert {n.kind for n in stored} == {"operator_alert"}


def test_a_down_worker_host_silences_the_stalled_queue_it_causes(stack: Stack):
    # Given two worker hosts, one of them down, and fetch messages waiting that nobody completes
    wait_for(
        lambda: stack.webhook.alerts("MailpipeWorkerDown"),
        seconds=ALERT_SECONDS,
        what="MailpipeWorkerDown at the webhook",
        server=stack.servers["alertmanager"],
    )

    # When Alertmanager has MailpipeQueueStalled as well
    def stalled() -> list[dict]:
        query = urllib.parse.quote('alertname="MailpipeQueueStalled"')
        url = f"{stack.alertmanager_url}/api/v2/alerts?filter={query}"
        return json.loads(http_get(url))

    [alert] = wait_for(stalled, seconds=ALERT_SECONDS, what="MailpipeQueueStalled in Alertmanager")

    # Then it is inhibited by the worker-down alert and never reaches the webhook
    assert alert["labels"]["queue"] == "fetch"
    assert alert["status"]["state"] == "suppressed"
    assert alert["status"]["inhibitedBy"]
    time.sleep(2)  # two more group intervals
    assert stack.webhook.alerts("MailpipeQueueStalled") == []


def test_the_optional_email_route_mails_critical_alerts_and_no_warnings(stack: Stack):
    # Given a real Alertmanager running alertmanager.yml with its e-mail blocks uncommented,
    # its smarthost a local SMTP server, and Prometheus firing a critical alert (a worker host
    # down) and a warning (a dead letter)

    # When Alertmanager delivers the critical alert
    [(sender, recipients, mail), *_] = wait_for(
        lambda: stack.smtp.about("MailpipeWorkerDown"),
        seconds=ALERT_SECONDS,
        what="MailpipeWorkerDown by e-mail",
        server=stack.servers["email-alertmanager"],
    )

    # Then it arrives as a mail from and to the configured addresses, saying what fired
    assert (sender, recipients) == ("alertmanager@example.org", ["oncall@example.org"])
    assert mail["To"] == "oncall@example.org"
    assert str(mail["Subject"]).startswith("[FIRING:")
    body = " ".join(
        part.get_content() for part in mail.walk() if part.get_content_maintype() == "text"
    )
    assert "A worker exporter is down" in body
    assert "docs/runbook.md#mailpipeworkerdown" in body

    # And the warning, which Alertmanager holds as well, is not mailed
    def dead_letter_active() -> list[dict]:
        query = urllib.parse.quote('alertname="MailpipeDeadLetters"')
        url = f"{stack.email_alertmanager_url}/api/v2/alerts?filter={query}"
        return json.loads(http_get(url))

    wait_for(dead_letter_active, seconds=ALERT_SECONDS, what="MailpipeDeadLetters there")
    time.sleep(2)  # two more group intervals
    assert stack.smtp.about("MailpipeDeadLetters") == []
