"""docker-compose.yml runs the project's own commands on the configuration files the tests check."""

from __future__ import annotations

import importlib
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
EXPECTED = {
    "redis",
    "postgres",
    "worker",
    "scheduler",
    "watcher",
    "web",
    "exporter",
    "prometheus",
    "alertmanager",
    "grafana",
    "proxy",
}
OWN = sorted(name for name, service in SERVICES.items() if "build" in service)


def mounts(service: str) -> dict[PurePosixPath, str]:
    """Container path -> source (a repository path for binds, a volume name otherwise)."""
    found = {}
    for entry in SERVICES[service].get("volumes", []):
        source, target, *_mode = entry.split(":")
        found[PurePosixPath(target)] = source
    return found


def host_path(service: str, container_path: str) -> Path:
    """The repository file a container path of a service comes from, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == target or target in path.parents:
            assert source.startswith("./"), f"{service}: {container_path} is not from the repo"
            return ROOT / source / path.relative_to(target)
    raise AssertionError(f"{service} does not mount {container_path}")


def flag(command: list[str], name: str) -> str:
    [value] = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    return value


def test_compose_runs_every_part_of_the_stack():
    assert set(SERVICES) == EXPECTED
    assert (ROOT / "Dockerfile").is_file()
    assert {SERVICES[name]["build"] for name in OWN} == {"."}
    assert OWN == ["exporter", "scheduler", "watcher", "web", "worker"]


def test_every_bind_mount_exists_and_every_volume_is_declared():
    for name in SERVICES:
        for target, source in mounts(name).items():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source} at {target}"
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} is not declared"


@pytest.mark.parametrize("service", OWN)
def test_every_service_command_is_one_the_project_provides(service: str):
    # Given the command compose runs in the project's image
    command = SERVICES[service]["command"]

    # When the project's own parser reads it, then it accepts it (argparse exits otherwise)
    if command[0] == "mailpipe":
        args = build_parser().parse_args(command[1:])
        assert callable(args.run), f"`{' '.join(command)}` names no mailpipe command"
    else:
        python, dash_m, module, *rest = command
        assert (python, dash_m) == ("python", "-m")
        assert Path(ROOT, *module.split(".")).with_suffix(".py").is_file()
        importlib.import_module(module).build_parser().parse_args(rest)


def test_prometheus_runs_the_repositorys_config_and_finds_its_rules():
    # Given the config file Prometheus is started with, traced back to the repository
    command = SERVICES["prometheus"]["command"]
    config_in_container = flag(command, "--config.file")
    config = host_path("prometheus", config_in_container)
    assert config == ROOT / "prometheus.yml"

    # Then its rule files, resolved next to the config inside the container, are the repo's
    parsed = yaml.safe_load(config.read_text())
    found = set()
    for pattern in parsed["rule_files"]:
        in_container = PurePosixPath(config_in_container).parent / pattern
        directory = host_path("prometheus", str(in_container.parent))
        found |= set(directory.glob(in_container.name))
    assert found == set((ROOT / "prometheus" / "rules").glob("*.yml"))
    assert found


def test_prometheus_targets_are_the_services_on_their_ports():
    parsed = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in parsed["scrape_configs"]
    }
    assert targets["mailpipe-worker"] == [f"exporter:{port('exporter')}"]
    assert targets["mailpipe-web"] == [f"web:{port('web')}"]
    assert targets["mailpipe-watcher"] == [f"watcher:{port('watcher', option='--metrics-port')}"]
    assert targets["alertmanager"] == ["alertmanager:9093"]
    [alerting] = parsed["alerting"]["alertmanagers"]
    assert alerting["static_configs"][0]["targets"] == ["alertmanager:9093"]


def port(service: str, *, option: str = "--port") -> int:
    command = SERVICES[service]["command"]
    return int(command[command.index(option) + 1])


def test_alertmanager_posts_to_the_web_app_with_the_token_both_share():
    # Given Alertmanager's config file, traced back to the repository
    command = SERVICES["alertmanager"]["command"]
    config = host_path("alertmanager", flag(command, "--config.file"))
    assert config == ROOT / "alertmanager.yml"
    [receiver] = yaml.safe_load(config.read_text())["receivers"]
    [hook] = receiver["webhook_configs"]

    # Then it reaches the web service, and reads the token from the secret the web app reads
    assert re.fullmatch(rf"http://web:{port('web')}/api/alerts/alertmanager", hook["url"])
    token_file = PurePosixPath(hook["http_config"]["authorization"]["credentials_file"])
    assert token_file.parent == PurePosixPath("/run/secrets")
    assert token_file.name in SERVICES["alertmanager"]["secrets"]
    assert token_file.name in SERVICES["web"]["secrets"]
    assert token_file.name in COMPOSE["secrets"]
    assert SERVICES["web"]["environment"]["MAILPIPE_ALERT_TOKEN_FILE"] == str(token_file)


def test_grafana_provisions_the_repositorys_datasource_and_dashboards():
    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    assert provisioning == ROOT / "grafana" / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "mailpipe.yml").read_text())
    [provider] = providers["providers"]
    dashboards = host_path("grafana", provider["options"]["path"])
    assert sorted(dashboards.glob("*.json")) == sorted((ROOT / "grafana/dashboards").glob("*.json"))
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_workers_and_exporter_share_one_metrics_directory():
    worker, exporter = SERVICES["worker"], SERVICES["exporter"]
    directory = worker["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert exporter["environment"]["PROMETHEUS_MULTIPROC_DIR"] == directory
    assert worker["environment"]["dramatiq_prom_db"] == directory
    assert (
        mounts("worker")[PurePosixPath(directory)] == mounts("exporter")[PurePosixPath(directory)]
    )
    assert exporter["pid"] == "service:worker"  # process ids name the metric files


def test_the_web_app_runs_several_processes_with_metrics_of_their_own():
    # Given the web service: gunicorn processes (sessions shared through Redis)
    args = build_parser().parse_args(SERVICES["web"]["command"][1:])
    assert args.workers > 1
    # Then their metrics meet in a directory no worker process writes to
    web = SERVICES["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert web != SERVICES["worker"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]


def test_nothing_in_the_stack_is_open_by_default():
    # Given the compose file as shipped
    text = (ROOT / "docker-compose.yml").read_text()
    # Then Grafana asks for a login, whose password has no default
    grafana = SERVICES["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    # And Prometheus and Alertmanager (which would deliver anyone's alerts to the web app with
    # its token) listen on the host's loopback only
    for service in ("prometheus", "alertmanager"):
        assert all(p.startswith("127.0.0.1:") for p in SERVICES[service]["ports"]), service
    # And the database password must be set: no service falls back to a default one
    assert "POSTGRES_PASSWORD:-" not in text
    assert (
        re.findall(r"\$\{POSTGRES_PASSWORD[^}]*\}", text)
        == ["${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"] * 2
    )


def test_prometheus_scrapes_the_web_app_with_the_token_the_web_app_reads():
    # Given the web app's /metrics, which answers only its bearer token
    parsed = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    [web_job] = [job for job in parsed["scrape_configs"] if job["job_name"] == "mailpipe-web"]
    # Then Prometheus sends the very file the web app reads, a secret both services mount
    credentials = web_job["authorization"]["credentials_file"]
    assert SERVICES["web"]["environment"]["MAILPIPE_METRICS_TOKEN_FILE"] == credentials
    assert credentials == "/run/secrets/web_metrics_token"
    for service in ("web", "prometheus"):
        assert "web_metrics_token" in SERVICES[service]["secrets"], service
    assert COMPOSE["secrets"]["web_metrics_token"] == {"environment": "MAILPIPE_METRICS_TOKEN"}


def caddy_sites(caddyfile: str) -> dict[str, list[str]]:
    """Each top-level site block of a Caddyfile (snippets aside): its address -> its lines."""
    sites: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in caddyfile.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(("\t", " ", "}")) and line.endswith("{"):
            address = line[:-1].strip()
            current = None if address.startswith("(") else sites.setdefault(address, [])
        elif current is not None and line != "}":
            current.append(line.strip())
    return sites


def test_users_reach_the_web_app_over_https_only_through_one_trusted_proxy():
    # Given the proxy service, its Caddyfile traced back to the repository
    proxy = SERVICES["proxy"]
    assert proxy["image"].startswith("caddy:2.")
    caddyfile = host_path("proxy", flag_after(proxy["command"], "--config"))
    assert caddyfile == ROOT / "caddy" / "Caddyfile"
    sites = caddy_sites(caddyfile.read_text())
    # Then plain HTTP only redirects to HTTPS, and HTTPS proxies to the web service's port
    assert sites["http://{$MAILPIPE_DOMAIN}"] == ["redir https://{host}{uri} permanent"]
    https = sites["https://{$MAILPIPE_DOMAIN}"]
    assert f"reverse_proxy web:{port('web')}" in https
    assert set(sites) == {"http://{$MAILPIPE_DOMAIN}", "https://{$MAILPIPE_DOMAIN}"}
    # And the certificate is Caddy's automatic one for the configured domain (the default), a
    # mounted file pair, or Caddy's internal CA: each mode names a snippet the Caddyfile has
    assert "import tls-{$MAILPIPE_TLS:auto}" in https
    assert proxy["environment"]["MAILPIPE_DOMAIN"].startswith("${MAILPIPE_DOMAIN:?")
    assert proxy["environment"]["MAILPIPE_TLS"] == "${MAILPIPE_TLS:-auto}"
    for mode in ("auto", "files", "internal"):
        assert f"(tls-{mode}) {{" in caddyfile.read_text()
    certs = re.findall(r"tls (\S+) (\S+)", caddyfile.read_text())
    assert certs == [("/etc/caddy/certs/cert.pem", "/etc/caddy/certs/key.pem")]
    assert host_path("proxy", "/etc/caddy/certs") == ROOT / "caddy" / "certs"
    assert sorted(proxy["ports"]) == ["443:443", "80:80"]
    # And the web app publishes no port of its own, trusts exactly that one proxy, and marks
    # its cookies Secure (with HSTS)
    web = SERVICES["web"]
    assert "ports" not in web
    assert web["environment"]["MAILPIPE_TRUSTED_PROXIES"] == "1"
    assert web["environment"]["MAILPIPE_COOKIE_SECURE"] == "true"


def test_every_process_that_keys_digests_reads_the_one_server_secret():
    # Given the services whose digests name Redis keys: connection slots (worker, watcher) and
    # the login throttle (web)
    for service in ("worker", "watcher", "web"):
        # Then each reads the same secret file, a compose secret it mounts
        environment = SERVICES[service]["environment"]
        assert environment["MAILPIPE_SERVER_SECRET_FILE"] == "/run/secrets/server_secret"
        assert "server_secret" in SERVICES[service]["secrets"], service
    assert COMPOSE["secrets"]["server_secret"] == {"environment": "MAILPIPE_SERVER_SECRET"}


def flag_after(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]
