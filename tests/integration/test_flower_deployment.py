"""Flower's deployment runtime on loopback: a real SuperLink, two real SuperNodes (one per
device), `flwr run` of the app against them, the run's status from `flwr list`, the metrics it wrote.
As across machines: TLS with a throwaway CA and SuperNode authentication with registered ECDSA
P-384 keys (README, "Beyond one machine: Flower", part 3). The plaintext deployment of part 2
(`--insecure`) differs only in Flower's flags; its own run here (70 s, a SuperLink and its
processes each importing torch) was dropped to keep the suite within its 15 minutes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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


def run_deployment(
    tiny_encoder_dir: Path,
    tmp_path: Path,
    connection: str,
    link_flags: list[str],
    node_flags: Callable[[int], list[str]],
    before_nodes: Callable[[dict, Callable[..., subprocess.Popen], str], None] = lambda env, start, address: None,
) -> None:
    """A SuperLink, two SuperNodes (partition-id 0 and 1), `flwr run` of a one-round FedAvg on the
    tiny model, then the run's status and metrics; every process started is stopped at the end.
    `connection` is the body of the `[superlink.loopback]` table (without its address);
    `before_nodes(env, start, superlink_address)` runs once the SuperLink listens (to register node keys)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n{connection}'
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
        link = start("superlink", "flower-superlink", *link_flags, "--port", str(link_port),
                     "--disable-runtime-dependency-installation")
        wait_for_port(link_port, link)
        before_nodes(env, start, f"127.0.0.1:{link_port}")
        for device in (0, 1):
            node_port = free_port()
            node = start(f"supernode-{device}", "flower-supernode", *node_flags(device),
                         "--superlink", f"127.0.0.1:{link_port}", "--port", str(node_port),
                         "--node-config", f"partition-id={device} num-partitions=2")
            wait_for_port(node_port, node)

        out = tmp_path / "run"
        overrides = [*tiny_run_overrides(tiny_encoder_dir, rounds=1), "partition.num_devices=2", "method=fedavg"]
        run_config = f"overrides='{' '.join(overrides)}' out='{out}'"
        submitted = flwr("run", str(flower_app(tmp_path / "app")), "loopback", "--run-config", run_config, "--format", "json", env=env, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = json.loads(submitted.stdout)["run-id"]

        # `flwr run` only says the run was submitted: its status comes from `flwr list`. Each
        # `flwr list` is a Python process (seconds of CPU on this 2-core machine, taken from the
        # run's processes), so it is asked every 3 s only once the ServerApp wrote its last
        # file, and every 30 s before (a run that failed writes none).
        deadline, status, asked = time.monotonic() + 480, "", time.monotonic()
        while time.monotonic() < deadline:
            assert link.poll() is None, "the SuperLink exited"
            if (out / "summary.json").is_file() or time.monotonic() - asked > 30:
                listed = flwr("list", "loopback", "--run-id", str(run_id), "--format", "json", env=env, cwd=tmp_path)
                asked = time.monotonic()
                if listed.returncode == 0:
                    status = json.loads(listed.stdout)["runs"][0]["status"]
                    if status.startswith("finished"):
                        break
                time.sleep(3)
            else:
                time.sleep(0.5)
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


def flower_app(folder: Path) -> Path:
    """The repository's Flower app: pyproject.toml and the package's source, the folders its FAB
    takes files from (pyproject.toml's fab-include), so the FAB is the one `flwr run .` builds
    in the repository. There `flwr run` first walks every file under the folder, the virtual
    environment's too (about 8 s of this test's CPU), before it keeps these."""
    shutil.copytree(REPO / "src" / "fibecfed", folder / "src" / "fibecfed",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "pyproject.toml", folder / "pyproject.toml")
    return folder


def make_certificates(folder: Path) -> None:
    """A throwaway CA (ca.crt) and a server certificate it signs (server.pem, server.key) for
    127.0.0.1 and localhost, as Flower's generate_cert.sh makes them."""
    folder.mkdir()

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=fibecfed test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.ext")


def make_node_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384 -N "" -f path` makes it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_flwr_run_on_a_loopback_deployment_with_tls_and_supernode_auth(tiny_encoder_dir, tmp_path):
    certs, keys = tmp_path / "certificates", tmp_path / "keys"
    make_certificates(certs)
    keys.mkdir()
    for name in ("node_0", "node_1", "stranger"):
        make_node_key(keys / name)

    def register_nodes(env: dict, start: Callable[..., subprocess.Popen], superlink: str) -> None:
        for device in (0, 1):
            registered = flwr("supernode", "register", str(keys / f"node_{device}.pub"), "loopback", "--format", "json",
                              env=env, cwd=tmp_path)
            assert registered.returncode == 0, registered.stdout + registered.stderr
            assert json.loads(registered.stdout)["success"] is True
        # A node whose key was not registered is refused (and gives up after one retry).
        stranger = start("supernode-stranger", "flower-supernode", "--root-certificates", str(certs / "ca.crt"),
                         "--auth-supernode-private-key", str(keys / "stranger"), "--max-retries", "1",
                         "--superlink", superlink, "--port", str(free_port()),
                         "--node-config", "partition-id=0 num-partitions=2")
        assert stranger.wait(timeout=90) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "supernode-stranger.log").read_text()

    run_deployment(
        tiny_encoder_dir, tmp_path,
        f'root-certificates = "{certs / "ca.crt"}"\n',
        ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
         "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"],
        lambda device: ["--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key",
                        str(keys / f"node_{device}")],
        register_nodes,
    )


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass  # the whole group has exited
