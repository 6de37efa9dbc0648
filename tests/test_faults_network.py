"""Label Studio killed mid-push and mid-pull, a flaky network, and the retry policy behind them.

One Label Studio per module that the scenarios may SIGKILL and restart (the session's shared one must stay
up); the network faults come from :mod:`faultproxy` in front of it. Nothing is mocked.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import faults_network
import pytest
from faultproxy import FaultPlan, FaultProxy

from pipeline.core.errors import PipelineError
from pipeline.labelstudio.client import TRANSPORT_RETRIES, RetryPolicy, Settings, Studio
from pipeline.labelstudio.server import LocalLabelStudio, free_port

FAST = RetryPolicy(attempts=3, base_delay_s=0.05, max_delay_s=0.1, budget_s=5.0)  # the same path, in a second


@pytest.fixture(scope="module")
def killable(label_studio_folder):
    """This module's own Label Studio on a fixed port, so that a kill and a restart find it at the same URL."""
    server = LocalLabelStudio(label_studio_folder("killable-label-studio"), port=free_port(faults_network.SERVER_PORT))
    server.start()
    yield server
    server.stop()


def through(proxy: FaultProxy, server: LocalLabelStudio, retry: RetryPolicy = FAST) -> Settings:
    return Settings(proxy.url, server.credentials.token, retry)


def test_push_completes_after_label_studio_was_killed_mid_push(sampled_run: Path, killable, tmp_path: Path) -> None:
    result = faults_network.scenario_push_ls_killed(tmp_path, run=sampled_run, server=killable)
    assert result.ok and result.faults_injected == len(faults_network.PUSH_KILLS[True]), result.detail
    for case in result.detail.values():
        assert case["files"] == 16 + 2 and case["duplicate_uploads"] == 0 and case["projects"] == 1
    assert result.detail["imported the tasks"]["next_push"]["adopted"] == 8  # found by run id, not re-imported


def test_pull_after_label_studio_was_killed_mid_pull_equals_an_undisturbed_pull(sampled_run: Path, killable,
                                                                                 tmp_path: Path) -> None:
    result = faults_network.scenario_pull_ls_killed(tmp_path, run=sampled_run, server=killable)
    assert result.ok and result.faults_injected == 1, result.detail
    assert result.detail["annotations"] == 8


def test_answers_lost_after_the_server_acted_are_found_by_the_retries(sampled_run: Path, killable,
                                                                       tmp_path: Path) -> None:
    result = faults_network.scenario_lost_answers(tmp_path, run=sampled_run, server=killable)
    assert result.ok and result.faults_injected == len(faults_network.LOST_ANSWERS) + 1, result.detail
    assert result.detail["files"] == 16 + 2 and result.detail["projects"] == result.detail["media_projects"] == 1


def test_push_and_pull_through_a_flaky_network_match_a_clean_run(sampled_run: Path, killable,
                                                                 tmp_path: Path) -> None:
    result = faults_network.scenario_flaky_network(tmp_path, run=sampled_run, server=killable)
    assert result.ok and result.faults_injected > 0, result.detail


@pytest.mark.parametrize(("plan", "error"), [(FaultPlan(reset=1.0), "ReadError"),
                                             (FaultPlan(truncate=1.0), "RemoteProtocolError"),
                                             (FaultPlan(bad_gateway=1.0), "HTTP 502")])
def test_broken_connections_end_in_one_line_after_the_policy_s_attempts(plan: FaultPlan, error: str, killable,
                                                                        caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline")
    with FaultProxy(killable.port, plan) as proxy:
        with pytest.raises(PipelineError) as raised:
            Studio(through(proxy, killable)).connect()
        assert proxy.exchanges == FAST.attempts  # the SDK's own retries are off: one request per attempt
    message = str(raised.value)
    assert error in message and "after 3 attempts" in message and "\n" not in message
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == FAST.attempts - 1 and all(error in r for r in retries)
    assert not any(killable.credentials.token in r for r in retries)


def test_calls_that_are_not_idempotent_are_sent_once(killable) -> None:
    with FaultProxy(killable.port) as proxy:
        studio = Studio(through(proxy, killable, RetryPolicy())).connect()
        proxy.plan = FaultPlan(bad_gateway=1.0)
        sent = proxy.exchanges
        with pytest.raises(PipelineError, match=r"failed to annotate task 1 \(HTTP 502\).* after 1 attempt "):
            studio.submit_annotation(1, 1, [], 1.0)
        assert proxy.exchanges == sent + 1
        studio.close()


def test_the_retry_budget_bounds_a_call(killable) -> None:
    policy = RetryPolicy(attempts=1000, base_delay_s=0.1, max_delay_s=0.2, budget_s=1.5)
    with FaultProxy(killable.port, FaultPlan(reset=1.0)) as proxy:
        started = time.monotonic()
        with pytest.raises(PipelineError, match="ReadError"):
            Studio(through(proxy, killable, policy)).connect()
        assert time.monotonic() - started < policy.budget_s + 1.0
        assert 3 < proxy.exchanges < 20


def test_a_dead_port_fails_fast_with_one_line(killable) -> None:
    started = time.monotonic()
    with pytest.raises(PipelineError) as raised:
        Studio(Settings(f"http://127.0.0.1:{free_port(1)}", "any-token")).connect()
    assert time.monotonic() - started < 5  # the transport's connect retries only; the policy adds none
    message = str(raised.value)
    assert f"(ConnectError) while trying to connect after {1 + TRANSPORT_RETRIES} connection attempts" in message
    assert "is it running?" in message and "\n" not in message


def test_retry_delays_grow_with_jitter_and_the_default_waits_fit_the_budget() -> None:
    policy, rng = RetryPolicy(), random.Random(0)
    for retry in range(8):
        ceiling = min(policy.max_delay_s, policy.base_delay_s * 2 ** retry)
        waits = [policy.delay(retry, rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits) and max(waits) > min(waits)
    worst = sum(min(policy.max_delay_s, policy.base_delay_s * 2 ** n) for n in range(policy.attempts - 1))
    assert worst < policy.budget_s  # every attempt the policy allows fits in its budget
