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
    "web",
    "exporter",
    "prometheus",
    "alertmanager",
    "grafana",
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
    assert OWN == ["exporter", "scheduler", "web", "worker"]


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
    assert targets["alertmanager"] == ["alertmanager:9093"]
    [alerting] = parsed["alerting"]["alertmanagers"]
    assert alerting["static_configs"][0]["targets"] == ["alertmanager:9093"]


def port(service: str) -> int:
    command = SERVICES[service]["command"]
    return int(command[command.index("--port") + 1])


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
