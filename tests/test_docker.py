"""The dockerised stack: the compose file as the Compose CLI resolves it, and the image's build instructions."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SECRETS = {"LABEL_STUDIO_PASSWORD": "a-password", "LABEL_STUDIO_API_KEY": "a-token-123",
           "POSTGRES_PASSWORD": "a-db-password"}
needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                   reason="docker-compose (Debian package) not installed; .ci/run installs it")


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``docker-compose config``: the file validated, variables substituted, paths resolved."""
    return subprocess.run(["docker-compose", "-f", str(DOCKER / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, env=env, cwd=DOCKER, check=False)


@pytest.fixture()
def resolved(tmp_path: Path) -> dict:
    """The stack as Compose would start it, with the runs folder and run name a user would set."""
    env = {k: v for k, v in os.environ.items() if k not in SECRETS} | SECRETS
    result = compose_config(env | {"RUNS_DIR": str(tmp_path / "runs"), "RUN_NAME": "myrun"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@needs_compose
def test_backend_reaches_label_studio_by_service_name_on_one_network(resolved: dict) -> None:
    services = resolved["services"]
    assert set(services) == {"postgres", "label-studio", "slim-backend"}
    studio, backend = services["label-studio"], services["slim-backend"]
    assert backend["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"  # not localhost: a container
    assert backend["environment"]["LABEL_STUDIO_API_KEY"] == studio["environment"]["LABEL_STUDIO_USER_TOKEN"]
    assert set(backend["networks"]) == set(studio["networks"]) == {"slim"}
    assert backend["depends_on"] == {"label-studio": {"condition": "service_started"}}
    assert {(p["published"], p["target"]) for p in backend["ports"]} == {(9090, 9090)}


@needs_compose
def test_both_services_see_the_runs_folder_where_the_backend_and_local_files_expect_it(resolved: dict,
                                                                                       tmp_path: Path) -> None:
    studio, backend = resolved["services"]["label-studio"], resolved["services"]["slim-backend"]
    runs = f"{tmp_path / 'runs'}:/runs"
    assert f"{runs}:ro" in studio["volumes"] and f"{runs}:rw" in backend["volumes"]  # only the backend writes
    assert studio["environment"]["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == "/runs"
    assert backend["environment"]["RUN_DIR"] == "/runs/myrun"
    assert any(v.startswith("label-studio-data:") for v in studio["volumes"]) and "label-studio-data" in resolved[
        "volumes"]  # annotations survive a container's removal


@needs_compose
def test_label_studio_keeps_its_data_in_postgres_once_it_is_healthy(resolved: dict) -> None:
    postgres, studio = resolved["services"]["postgres"], resolved["services"]["label-studio"]
    assert postgres["image"].split(":")[0] == "postgres" and "ports" not in postgres  # only the network sees it
    db, env = postgres["environment"], studio["environment"]
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_HOST"] == "postgres" and env["POSTGRE_PORT"] == "5432"
    assert (env["POSTGRE_NAME"], env["POSTGRE_USER"], env["POSTGRE_PASSWORD"]) == (
        db["POSTGRES_DB"], db["POSTGRES_USER"], db["POSTGRES_PASSWORD"]) == ("labelstudio", "labelstudio",
                                                                             "a-db-password")
    assert studio["depends_on"] == {"postgres": {"condition": "service_healthy"}}  # not before it accepts connections
    check = postgres["healthcheck"]
    assert check["test"][0] == "CMD-SHELL" and check["test"][1].startswith("pg_isready -h 127.0.0.1 ")
    assert set(postgres["networks"]) == set(studio["networks"]) == {"slim"}
    assert "postgres-data:/var/lib/postgresql/data:rw" in postgres["volumes"] and "postgres-data" in resolved[
        "volumes"]  # the database survives a container's removal


@needs_compose
def test_backend_image_builds_from_the_repository(resolved: dict) -> None:
    build = resolved["services"]["slim-backend"]["build"]
    assert Path(build["context"]) == ROOT and (ROOT / build["dockerfile"]).is_file()


@needs_compose
@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_secrets(missing: str) -> None:
    given = {k: v for k, v in SECRETS.items() if k != missing}
    result = compose_config({k: v for k, v in os.environ.items() if k not in SECRETS} | given)
    assert result.returncode != 0 and missing in result.stderr


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, comments dropped and continued lines joined, as Docker reads them."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def test_image_installs_every_package_and_serves_the_wsgi_app_with_gunicorn() -> None:
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    args = dict(arg.split("=", 1) for kind, arg in instructions if kind == "ARG")
    assert args["TORCH_VERSION"] == "2.14.1" and args["TORCH_INDEX"].endswith("/whl/cpu")  # CPU by default
    copied = {shlex.split(arg)[0] for kind, arg in instructions if kind == "COPY"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {pattern.rstrip("*") for pattern in packages["include"]} <= copied  # nothing the wheel needs is missing
    (command,) = [shlex.split(arg) for kind, arg in instructions if kind == "CMD"]
    assert command[0] == "gunicorn" and command[-1] == "ml_backend._wsgi:app"
