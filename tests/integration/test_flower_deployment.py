"""Flower's deployment runtime on loopback: a real SuperLink, two real SuperNodes (one per
device), `flwr run .` against them, the run's status from `flwr list`, the metrics it wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from tests.conftest import REPO, tiny_run_overrides  # noqa: E402

pytestmark = pytest.mark.flower

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process {process.args[0]} exited with {process.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def flwr(*args: str, env: dict, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_flwr_run_on_a_loopback_deployment(tiny_encoder_dir, tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    # The venv's flwr-serverapp / flwr-clientapp first on PATH: the SuperLink and SuperNodes start them.
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        # A session of its own: its children (SuperExec, ServerApp, ClientApp processes) share its group id.
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        return process

    try:
        link = start("superlink", "flower-superlink", "--insecure", "--port", str(link_port),
                     "--disable-runtime-dependency-installation")
        wait_for_port(link_port, link)
        for device in (0, 1):
            node_port = free_port()
            node = start(f"supernode-{device}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                         "--port", str(node_port), "--node-config", f"partition-id={device} num-partitions=2")
            wait_for_port(node_port, node)

        out = tmp_path / "run"
        overrides = [*tiny_run_overrides(tiny_encoder_dir, rounds=1), "partition.num_devices=2", "method=fedavg"]
        run_config = f"overrides='{' '.join(overrides)}' out='{out}'"
        submitted = flwr("run", str(REPO), "loopback", "--run-config", run_config, "--format", "json", env=env, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = json.loads(submitted.stdout)["run-id"]

        # `flwr run` only says the run was submitted: its status comes from `flwr list`.
        deadline, status = time.monotonic() + 480, ""
        while time.monotonic() < deadline:
            listed = flwr("list", "loopback", "--run-id", str(run_id), "--format", "json", env=env, cwd=tmp_path)
            if listed.returncode == 0:
                status = json.loads(listed.stdout)["runs"][0]["status"]
                if status.startswith("finished"):
                    break
            time.sleep(3)
        logs = "\n".join((tmp_path / f"{n}.log").read_text()[-1500:] for n in ("superlink", "supernode-0"))
        assert status == "finished:completed", f"status {status!r}\n{logs}"

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1]
        assert rows[1]["devices"] == [0, 1] and rows[1]["failed_devices"] == []
        assert rows[1]["upload_bytes"] > 0 and rows[1]["download_bytes"] > 0 and rows[1]["accuracy"] is not None
        for name in ("summary.json", "accuracy.png", "adapter/adapter_model.safetensors"):
            assert (out / name).is_file(), name
    finally:
        # Every process this test started, and their children, by process group id.
        for process in reversed(started):
            _signal_group(process, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass  # the whole group has exited
