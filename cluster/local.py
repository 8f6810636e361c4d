"""A local multi-node Ray cluster on this machine: one head plus N worker nodes.

    python cluster/local.py start  --dir DIR [--workers N]   # writes DIR/cluster.json
    python cluster/local.py status --dir DIR
    python cluster/local.py stop   --dir DIR

Then `RAY_ADDRESS=<address> RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=DIR/auth_token vits-ray train ...`,
or `ray job submit --address <dashboard_url> ...` with the same two RAY_AUTH_* variables (`start`
prints these). Worker node i carries the custom resource `node_w<i>` so work can be pinned to it.
Useful to exercise the multi-node code paths (placement, object transfer between raylets, a node
dying, `ray job submit`) without a cloud.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(token_path: Path) -> dict:
    env = dict(os.environ)
    # A token of our own, in DIR, so the cluster never reads or overwrites ~/.ray/auth_token
    # (which the in-process clusters of `ray.init()` use).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    env.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    env.pop("RAY_ADDRESS", None)  # `ray start --head` must not try to join another cluster
    # `python` in a submitted job's entrypoint is this interpreter (the venv's), as `python` is the
    # image's own on a real cluster, even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Ray's OpenTelemetry metrics thread has crashed actors here (see the Makefile).
    env["RAY_enable_metrics_collection"] = "0"
    return env


def _temp_root(d: Path) -> Path:
    # Ray puts unix sockets under the temp dir; their paths must stay under ~107 bytes, which
    # a pytest tmp_path is not. A short, DIR-specific path keeps them short and unique.
    return Path("/tmp") / f"vr-{hashlib.sha1(str(d.resolve()).encode()).hexdigest()[:10]}"


def _ray_start(node: Path, args: list[str], env: dict, log: Path) -> None:
    """`ray start` for one node whose files all live in `node` (under the cluster's temp root), as
    on a machine of its own: Ray's temp dir, and TMPDIR for everything its processes start. Nodes
    sharing Ray's temp dir would share its logs folder, and each node's log monitor would then print
    every worker's lines once per node. TMPDIR must be short too: the dashboard's forkserver puts
    a unix socket there (a pytest tmp_path is too long), and what workers stage there (checkpoints)
    goes when `stop` removes the temp root."""
    (node / "tmp").mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        r = subprocess.run([RAY, "start", "--disable-usage-stats", *args, "--temp-dir", str(node)],
                           env={**env, "TMPDIR": str(node / "tmp")},
                           stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if r.returncode:
        raise SystemExit(f"ray start failed ({r.returncode}); see {log}")


def start(d: Path, workers: int, head_cpus: int, object_store_mb: int, dashboard: bool = True) -> dict:
    from ray._private.services import resolve_ip_for_localhost

    d.mkdir(parents=True, exist_ok=True)
    token = d / "auth_token"
    token.write_text(secrets.token_hex(32))  # the same format Ray generates
    token.chmod(0o600)
    env, tmp, log = _env(token), _temp_root(d), d / "ray-start.log"
    # `ray start` replaces 127.0.0.1 with this host's reachable IP (resolve_ip_for_localhost);
    # compute the same so the recorded address is the one the GCS advertises.
    ip = resolve_ip_for_localhost("127.0.0.1")
    port = _free_port()
    address = f"{ip}:{port}"
    # Every port is picked free so that this cluster and any other one on the machine
    # (a `ray.init()` in a test session, a second local cluster) cannot collide.
    mem = str(object_store_mb * 1024 * 1024)
    dashboard_port = _free_port()
    info = {"address": address, "token_path": str(token), "temp_dir": str(tmp),
            # The dashboard serves the job server (`ray job submit`) and the State API (which Ray
            # Train's PlacementGroupCleaner needs); on loopback only.
            "dashboard_url": f"http://127.0.0.1:{dashboard_port}" if dashboard else None,
            "workers": workers, "worker_resources": [f"node_w{i}" for i in range(1, workers + 1)]}
    (d / "cluster.json").write_text(json.dumps(info, indent=2))  # written first: stop works on a half start
    _ray_start(tmp / "head", ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--num-cpus", str(head_cpus), "--num-gpus", "0", "--object-store-memory", mem,
                              f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host", "127.0.0.1",
                              "--dashboard-port", str(dashboard_port),
                              "--ray-client-server-port", str(_free_port()),
                              "--dashboard-agent-listen-port", str(_free_port())], env, log)
    for i in range(1, workers + 1):
        _ray_start(tmp / f"w{i}", ["--address", address, "--node-ip-address", "127.0.0.1",
                                   "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", mem,
                                   "--resources", json.dumps({f"node_w{i}": 1}),
                                   "--dashboard-agent-listen-port", str(_free_port())], env, log)
    return info


def _cluster_procs(info: dict) -> list:
    """This cluster's processes, and no other cluster's.

    `ray stop` is not scoped: it kills every Ray process of the user on the machine. Ours are
    the ones whose command line names our temp dir (GCS, raylets, monitors, dashboard) or our
    GCS address (the client server), plus their descendants (agents, core workers).
    """
    import psutil

    addr = re.compile(re.escape(info["address"]) + r"(?![0-9])")
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and (info["temp_dir"] + "/" in cmd or addr.search(cmd)):
            roots.append(p)
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def kill(procs: list, wait_s: float) -> None:
    """SIGKILL `procs` (gone ones are skipped) and wait up to `wait_s` for them to exit."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=wait_s)


def stop(d: Path, grace_s: float = 3.0) -> int:
    import psutil

    path = d / "cluster.json"
    if not path.exists():
        return 0
    info = json.loads(path.read_text())
    procs = _cluster_procs(info)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    # The GCS lingers well past SIGTERM once its raylets are gone (>15 s here); this throwaway
    # cluster keeps nothing worth a graceful shutdown, so survivors of the grace get SIGKILL.
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    kill(alive, wait_s=5)
    shutil.rmtree(info["temp_dir"], ignore_errors=True)  # sessions, sockets, logs: ours only
    path.unlink()
    return len(procs)


def status(d: Path) -> int:
    info = json.loads((d / "cluster.json").read_text())
    return subprocess.run([RAY, "status", "--address", info["address"]],
                          env=_env(Path(info["token_path"]))).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--dir", type=Path, required=True, help="state: cluster.json, token, logs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--head-cpus", type=int, default=1, help="head CPUs (drivers, Train controller)")
    ap.add_argument("--object-store-mb", type=int, default=256)
    ap.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                    help="the dashboard on 127.0.0.1: job server, State API (on by default)")
    a = ap.parse_args(argv)
    if a.action == "start":
        if (a.dir / "cluster.json").exists():  # checked here: a failed start stops what it started
            raise SystemExit(f"{a.dir}/cluster.json exists: stop that cluster first")
        t = time.monotonic()
        try:
            info = start(a.dir, a.workers, a.head_cpus, a.object_store_mb, a.dashboard)
        except BaseException:
            stop(a.dir)
            raise
        print(json.dumps(info, indent=2))
        print(f"# started in {time.monotonic() - t:.1f}s; connect with:\n"
              f"export RAY_ADDRESS={info['address']} RAY_AUTH_MODE=token "
              f"RAY_AUTH_TOKEN_PATH={info['token_path']}")
        if info["dashboard_url"]:
            print(f"# jobs: ray job submit --address {info['dashboard_url']} --working-dir . -- python jobs/...")
        return 0
    if a.action == "stop":
        print(f"stopped {stop(a.dir)} processes")
        return 0
    return status(a.dir)


if __name__ == "__main__":
    sys.exit(main())
