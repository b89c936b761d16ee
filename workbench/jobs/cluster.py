"""A real local Ray cluster for tests and benchmarks: a head and more nodes, loopback only.

:func:`start_local_cluster` runs ``python -m workbench.jobs.raystart start`` for each node in
its own process group, on free ports, every node bound to 127.0.0.1 with ``--num-cpus`` each,
usage statistics off, its own temporary directory; it then checks that every socket the
cluster's processes listen on is on the loopback address (stopping the cluster and raising
otherwise). :meth:`LocalCluster.stop` kills exactly the processes it started (``ray stop``
would stop every Ray process of the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class LocalCluster:
    """A started local cluster: its GCS ``address`` and the process groups it runs in."""

    address: str
    temp_dir: Path
    pgids: list[int] = field(default_factory=list)

    def pids(self) -> list[int]:
        import psutil

        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) in self.pgids:
                    out.append(p.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return out

    def check_loopback(self) -> None:
        """Every listening socket of the cluster's processes is on 127.0.0.1."""
        import psutil

        bad = []
        for pid in self.pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            bad += [
                f"{c.laddr.ip}:{c.laddr.port}"
                for c in conns
                if c.status == psutil.CONN_LISTEN
                and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1")
            ]
        if bad:
            self.stop()
            raise WorkbenchError(
                f"the local Ray cluster listened beyond loopback ({', '.join(sorted(bad))})",
                "install the locked ray (the loopback launcher supports its version only)",
            )

    def stop(self, grace_s: float = 1.0) -> None:
        """SIGTERM the cluster's process groups (last node first), SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            for pg in reversed(self.pgids):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pg, sig)
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # `ray start` of a node refuses it
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/")
    env.update(extra)
    return env


def start_local_cluster(
    nodes: int = 2, cpus_per_node: int = 1, object_store_mb: int = 200, timeout_s: float = 120
) -> LocalCluster:
    """Start a head and ``nodes - 1`` more nodes on this machine (module docstring)."""
    gcs, client, dash_metric, autoscaler_metric, *agents = _free_ports(4 + nodes)
    temp = Path(tempfile.mkdtemp(prefix="wbray-"))
    cluster = LocalCluster(f"127.0.0.1:{gcs}", temp)
    env = _env({"DASHBOARD_METRIC_PORT": str(dash_metric),
                "AUTOSCALER_METRIC_PORT": str(autoscaler_metric)})  # fmt: skip
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node),
              "--num-gpus", "0", "--object-store-memory", str(object_store_mb * 1024 * 1024),
              "--disable-usage-stats", "--temp-dir", str(temp), "--log-style", "record",
              "--log-color", "false"]  # fmt: skip
    head = ["--head", "--port", str(gcs), "--include-dashboard=false",
            "--ray-client-server-port", str(client)]  # fmt: skip
    try:
        for i in range(nodes):
            role = head if i == 0 else ["--address", cluster.address]
            cmd = [sys.executable, "-m", "workbench.jobs.raystart", "start", *role,
                   "--dashboard-agent-listen-port", str(agents[i]), *common]  # fmt: skip
            log = open(temp / f"start-{i}.log", "w")  # noqa: SIM115 (kept by the process)
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
            cluster.pgids.append(proc.pid)
            try:
                rc = proc.wait(timeout=timeout_s)  # a node retries forever without a head
            except subprocess.TimeoutExpired:
                rc = -1
            if rc != 0:
                text = (temp / f"start-{i}.log").read_text(errors="replace").strip()
                raise WorkbenchError(
                    f"starting local Ray node {i} failed (exit {rc}): "
                    f"{text.splitlines()[-1] if text else 'no output'}",
                    "see the log above; is the ray extra installed (make setup)?",
                )
        cluster.check_loopback()
    except BaseException:
        cluster.stop()
        raise
    return cluster
