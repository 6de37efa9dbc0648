"""The dockerised stack's files: the compose file validates and wires the backend to Label Studio correctly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
ENV = {"LABEL_STUDIO_PASSWORD": "a-password", "LABEL_STUDIO_API_KEY": "a-token-123"}


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose (Debian package) not installed; .ci/run installs it")
def test_compose_file_validates_with_the_compose_cli() -> None:
    result = subprocess.run(["docker-compose", "-f", str(DOCKER / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, env={**os.environ, **ENV}, cwd=DOCKER, check=False)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"label-studio", "slim-backend"}


def test_compose_refuses_to_start_without_secrets() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed")
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    result = subprocess.run(["docker-compose", "-f", str(DOCKER / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, env=env, cwd=DOCKER, check=False)
    assert result.returncode != 0 and "LABEL_STUDIO_PASSWORD" in result.stderr


def test_backend_reaches_label_studio_by_service_name_on_one_network() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    backend, studio = compose["services"]["slim-backend"], compose["services"]["label-studio"]
    assert backend["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert "localhost" not in yaml.safe_dump(backend) and "127.0.0.1" not in yaml.safe_dump(backend)
    assert backend["networks"] == studio["networks"]
    assert any(v.startswith("label-studio-data:") for v in studio["volumes"])
    assert any(v.endswith(":/runs") for v in backend["volumes"])
    assert backend["build"]["dockerfile"] == "docker/Dockerfile"


def test_dockerfile_serves_the_wsgi_app_with_gunicorn() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert 'gunicorn' in text and "ml_backend._wsgi:app" in text
