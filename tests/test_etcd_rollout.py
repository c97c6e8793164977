"""A rolling update through a real balancer that follows etcd: the sidecar's promise with `registry.kind = "etcd"`.

nginx's upstream is rendered from the etcd prefix by testkit/etcd_watch.py (confd-like: watch, render, reload), a
``lag`` after each change standing in for a consumer's horizon. The load client counts every request (nginx retries
are off); the same harness runs the naive rollout (app signalled first) as the control, so a zero for the sidecar
means something. The watcher itself is checked first: what it renders, that it reloads nginx, honours the lag,
renders the empty set as a ``down`` server, and stops on SIGINT and SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from examples.rollout.nginx import UpstreamNginx
from examples.rollout.rollout import EtcdWatchCluster, counted_rollout
from testkit import free_port, http_get, session_members, wait_for
from testkit.etcd import Etcd, etcdctl
from testkit.etcd_watch import EMPTY, EtcdWatcher, prefix_range_end, render, server_of

# --- pure logic (unit) -------------------------------------------------------------------------------------


def test_server_of_takes_only_add_entries_with_a_host_and_port() -> None:
    """Red if a delete (Op 1), a value without a port, or a value that is not JSON became a server line."""
    assert server_of(b'{"Op":0,"Addr":"127.0.0.2:8080","Metadata":{"tags":["v1"]}}') == "127.0.0.2:8080"
    assert server_of(b'{"Addr":"[::1]:80"}') == "[::1]:80"  # the endpoints manager's current value has no Op
    assert server_of(b'{"Op":1,"Addr":"127.0.0.2:8080"}') is None
    assert server_of(b'{"Op":0,"Addr":"127.0.0.2"}') is None
    assert server_of(b'{"Op":0,"Addr":"127.0.0.2:0"}') is None
    assert server_of(b'{"Op":0,"Addr":"a; include /etc/passwd:80"}') is None
    assert server_of(b"not json") is None


def test_render_sorts_servers_and_renders_the_empty_set_as_a_down_server() -> None:
    """Red if the order followed the keys' arrival (a needless reload) or an empty set rendered no server
    (nginx refuses an upstream without one)."""
    assert render(["127.0.0.3:80", "127.0.0.2:80"], "p/") == render(["127.0.0.2:80", "127.0.0.3:80"], "p/")
    assert "server 127.0.0.2:80 max_fails=0;\nserver 127.0.0.3:80 max_fails=0;" in render(
        ["127.0.0.3:80", "127.0.0.2:80"], "p/"
    )
    assert EMPTY in render([], "p/") and "down;" in EMPTY


def test_prefix_range_end_is_etcds_prefix_end() -> None:
    """Red if the range missed keys under the prefix or took its neighbours (services/web/ vs services/web2)."""
    assert prefix_range_end("services/web/") == b"services/web0"
    assert prefix_range_end("a") == b"b"


# --- the watcher against real etcd and real nginx ---------------------------------------------------------


def put(endpoint: str, key: str, addr: str) -> None:
    etcdctl(endpoint, "put", key, json.dumps({"Op": 0, "Addr": addr, "Metadata": {}}))


@pytest.mark.integration
def test_watcher_renders_reloads_after_the_lag_and_stops_on_signals(
    tmp_path: Path, etcd: Etcd, etcd_prefix: str
) -> None:
    """Keys put and deleted under the prefix reach nginx's upstream file and nginx is reloaded (its worker
    changes); a change is applied no sooner than ``lag`` after the watcher saw it; the empty set renders the
    ``down`` server and nginx answers 502; SIGINT (Ctrl-C) and SIGTERM end the watcher with status 0, leaving
    no process. Red if the watcher ignored deletes, applied at once, did not reload, or hung on a signal."""
    nginx = UpstreamNginx(tmp_path / "nginx", free_port())
    nginx.start()
    try:
        wait_for(nginx.pid_written, 10, 0.05, "nginx's pid file")
        prefix = f"{etcd_prefix}web/"
        lag = 1.0
        watcher = EtcdWatcher(tmp_path, etcd.endpoint, prefix, nginx.upstream, nginx.pid_file, lag)
        watcher.start()
        assert EMPTY in nginx.upstream.read_text()
        code, _ = http_get_status(nginx.url)
        assert code == 502  # no live upstream

        workers_before = nginx_workers(nginx)
        put(etcd.endpoint, f"{prefix}a", "127.0.0.2:8080")
        put(etcd.endpoint, f"{etcd_prefix}web2/x", "127.0.0.9:8080")  # a neighbour of the prefix: not ours
        applied = watcher.wait_applied(["127.0.0.2:8080"])
        assert applied["applied"] - applied["seen"] >= lag - 0.05, applied
        watcher.wait_event(lambda e: e["event"] == "watch.reloaded", 10, "a reload")
        assert "server 127.0.0.2:8080 max_fails=0;" in nginx.upstream.read_text()
        wait_for(lambda: nginx_workers(nginx) - workers_before, 10, 0.05, "a new nginx worker after the reload")

        since = time.time()
        etcdctl(etcd.endpoint, "del", f"{prefix}a")
        emptied = watcher.wait_applied([], timeout=10, since=since)
        assert not emptied["initial"] and emptied["applied"] - emptied["seen"] >= lag - 0.05
        assert EMPTY in nginx.upstream.read_text()

        assert watcher.proc is not None
        watcher.proc.send_signal(signal.SIGINT)
        assert watcher.proc.wait(10) == 0
        assert watcher.events()[-1]["event"] == "watch.stopped"
        assert not session_members(watcher.proc.pid)

        again = EtcdWatcher(tmp_path / "again", etcd.endpoint, prefix, nginx.upstream, nginx.pid_file, lag)
        (tmp_path / "again").mkdir()
        again.start()
        assert again.stop() == 0
    finally:
        nginx.stop()
        etcdctl(etcd.endpoint, "del", "--prefix", etcd_prefix)


@pytest.mark.integration
def test_watcher_follows_etcd_across_a_restart(tmp_path: Path, fresh_etcd: Etcd) -> None:
    """etcd restarted under the watcher: the broken watch is logged (``watch.broken``), the watcher ranges and
    watches again, and a key put after the restart reaches nginx's upstream. Red if a broken stream ended the
    watcher or left it following nothing."""
    nginx = UpstreamNginx(tmp_path / "nginx", free_port())
    nginx.start()
    try:
        wait_for(nginx.pid_written, 10, 0.05, "nginx's pid file")
        watcher = EtcdWatcher(tmp_path, fresh_etcd.endpoint, "services/web/", nginx.upstream, nginx.pid_file, 0.0)
        watcher.start()
        put(fresh_etcd.endpoint, "services/web/a", "127.0.0.2:8080")
        watcher.wait_applied(["127.0.0.2:8080"])
        fresh_etcd.restart()
        watcher.wait_event(lambda e: e["event"] == "watch.broken", 30, "the broken watch")
        put(fresh_etcd.endpoint, "services/web/b", "127.0.0.3:8080")
        watcher.wait_applied(["127.0.0.2:8080", "127.0.0.3:8080"])
        wait_for(lambda: "server 127.0.0.3:8080" in nginx.upstream.read_text(), 10, 0.05, "the upstream file")
        assert watcher.stop() == 0
    finally:
        nginx.stop()


def http_get_status(url: str) -> tuple[int, bytes]:
    import urllib.error

    try:
        return http_get(url, timeout=2)
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def nginx_workers(nginx: UpstreamNginx) -> set[int]:
    assert nginx.proc is not None
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(nginx.proc.pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


# --- the rollout ------------------------------------------------------------------------------------------


async def one_rollout(workdir: Path, etcd: Etcd, prefix: str, naive: bool) -> tuple[int, int, dict[str, int]]:
    # lag 1 s + an nginx reload (tens of ms) is well inside the sidecar's 3 s propagation_delay.
    cluster = EtcdWatchCluster(workdir, propagation_delay="3s", log=lambda _: None, lag=1.0, etcd=etcd, prefix=prefix)
    return await counted_rollout(cluster, naive)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_etcd_rollout_with_sidecar_loses_nothing_and_naive_control_fails(
    tmp_path: Path, etcd: Etcd, etcd_prefix: str
) -> None:
    """1. Two v1 instances (registry.kind etcd, propagation_delay 3s) behind nginx whose upstream the watcher
       renders from etcd 1 s after each change; 200 requests/s; surge-roll them to v2 with the sidecar's drain.
       Expected: zero failed requests, and both versions served traffic.
    2. The identical rollout with the same watcher and load, SIGTERM straight to the old apps.
       Expected: failed requests (the control: the harness sees failures).
    Red with a propagation_delay shorter than the lag (e.g. "100ms": the app stops while nginx still routes to it).
    """
    requests, failed, by_version = await one_rollout(tmp_path / "sidecar", etcd, f"{etcd_prefix}sidecar", False)
    assert requests > 1000
    assert by_version.get("v1", 0) > 100 and by_version.get("v2", 0) > 100
    assert failed == 0, f"{failed} of {requests} requests failed with the sidecar"

    requests_n, failed_n, _ = await one_rollout(tmp_path / "naive", etcd, f"{etcd_prefix}naive", True)
    assert requests_n > 500
    assert failed_n > 0, "the naive rollout lost no request: the harness cannot see failures"
