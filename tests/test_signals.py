"""Every process the tool starts stops with it: SIGINT, SIGTERM and SIGHUP to the command free the port.

Real processes: ``python -m pipeline labelstudio`` (which starts a Label Studio in its own session) and
``python -m ml_backend``; the signal goes to the tool's process only, as ``kill PID`` or a closing terminal
would send it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import port_is_free

from pipeline.labelstudio.server import free_port, is_healthy

START_TIMEOUT_S = 240  # on a migrated database Label Studio answers in ~8 s; a busy runner can take many times that
STOP_TIMEOUT_S = 40  # the tool's own grace time for Label Studio (20 s) plus margin
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def signals_not_ignored():
    """A runner started with ``nohup``, or as a background job of a script, ignores SIGHUP or SIGINT; ignored signals
    stay ignored across exec, so the tool would inherit that and rightly keep running. While these tests run, the
    runner catches such a signal instead (and does nothing with it): a caught signal is at its default in a child."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGHUP)}
    for sig, handler in previous.items():
        if handler == signal.SIG_IGN:
            signal.signal(sig, lambda *_: None)
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (a port or data folder only our servers use)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_with(process: subprocess.Popen, sig: int) -> int:
    process.send_signal(sig)
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def label_studio_home(label_studio_folder) -> Path:
    """One data folder for the three starts, with a migrated database (the command's own start is timed, not
    Label Studio's migrations)."""
    return label_studio_folder("ls-signals")


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_labelstudio_command_stops_its_server(sig: int, label_studio_home: Path) -> None:
    port = free_port(0)
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "labelstudio", "--data-dir",
                                str(label_studio_home), "--port", str(port)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: is_healthy(f"http://127.0.0.1:{port}") or process.poll() is not None, START_TIMEOUT_S,
                 "Label Studio to answer")
        assert process.poll() is None, process.stderr.read().decode()
        assert processes_mentioning(f"--port {port}"), "the command should have started a server"
        status = stop_with(process, sig)
    finally:
        if process.poll() is None:
            process.kill()
    assert status in (0, 130, 128 + sig), process.stderr.read().decode()
    wait_for(lambda: not processes_mentioning(f"--port {port}"), 5, "the server's processes to exit")
    assert port_is_free(port)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_ml_backend_stops_and_frees_its_port(sig: int, trained_run: Path) -> None:
    port = free_port(0)
    process = subprocess.Popen([sys.executable, "-m", "ml_backend", "--run", str(trained_run), "--port", str(port)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: not port_is_free(port) or process.poll() is not None, 120, "the backend to listen")
        assert process.poll() is None
        stop_with(process, sig)
    finally:
        if process.poll() is None:
            process.kill()
    wait_for(lambda: port_is_free(port), 5, "the backend's port to be released")
