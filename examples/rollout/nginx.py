"""nginx in front of the instances, following Consul DNS or etcd the way operators run it.

``Nginx`` (Consul): ``resolver ... valid=1s``: nginx re-resolves ``web.service.consul`` at most once a
second, so an instance that leaves Consul stops getting new requests within
about two seconds. ``UpstreamNginx`` (etcd): an ``upstream`` block that includes a file rendered
by testkit/etcd_watch.py (confd-like: watch the prefix, render, reload nginx).
Both: ``proxy_next_upstream off``: nginx must not retry a failed
request on another instance, which would hide exactly the failures we count.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

from testkit import spawn, wait_for

_HEAD = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
"""
# Closes the location, the server and http: each config ends with its proxy settings.
_TAIL = """\
            # Never retry on another instance: a failed request must show as failed.
            proxy_next_upstream off;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""

CONF = (
    _HEAD
    + """\

    # Consul DNS; valid= caps nginx's own cache of the answer (1s by default).
    resolver 127.0.0.1:{dns_port} valid={valid} ipv6=off;
    resolver_timeout 1s;

    server {{
        listen {listen_host}:{listen_port};
        location / {{
            # A variable in proxy_pass makes nginx resolve at request time (through the resolver above).
            set $backend {service}.service.consul;
            proxy_pass http://$backend:{app_port};
{proxy_bind}"""
    + _TAIL
)


UPSTREAM_CONF = (
    _HEAD
    + """\

    # The servers come from etcd: testkit/etcd_watch.py renders this file and reloads nginx (SIGHUP).
    upstream {service} {{
        include {upstream};
    }}

    server {{
        listen {listen_host}:{listen_port};
        location / {{
            proxy_pass http://{service};
"""
    + _TAIL
)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise RuntimeError("nginx is not installed: run scripts/setup (Debian: apt-get install nginx-light)")
    return found


def render(
    prefix: Path,
    dns_port: int,
    listen_port: int,
    app_port: int,
    service: str = "web",
    listen_host: str = "127.0.0.1",
    valid: str = "1s",
    source: str | None = None,
) -> str:
    """``valid``: the resolver's validity (nginx's time syntax); ``source``: the address nginx connects to
    the instances from (``proxy_bind``), so that they can tell nginx from other peers on loopback."""
    return CONF.format(
        prefix=prefix,
        dns_port=dns_port,
        listen_host=listen_host,
        listen_port=listen_port,
        app_port=app_port,
        service=service,
        valid=valid,
        proxy_bind=f"            proxy_bind {source};\n" if source else "",
    )


class Nginx:
    def __init__(
        self,
        prefix: Path,
        dns_port: int,
        listen_port: int,
        app_port: int,
        service: str = "web",
        valid: str = "1s",
        source: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.listen_port = listen_port
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(render(prefix, dns_port, listen_port, app_port, service, valid=valid, source=source))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}/"

    def test_config(self) -> None:
        subprocess.run(
            [nginx_binary(), "-t", "-q", "-p", str(self.prefix), "-c", str(self.conf)], check=True, capture_output=True
        )

    def start(self) -> None:
        self.proc = spawn([nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf)], self.prefix / "nginx.out")
        wait_for(self._listening, 10, 0.05, f"nginx on port {self.listen_port}")

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(self.prefix / 'error.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.listen_port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class UpstreamNginx(Nginx):
    """nginx whose upstream ``service`` is the file ``upstream`` (``prefix/upstream.conf``), rendered from etcd by
    testkit/etcd_watch.py; until the watcher's first render it holds the ``down`` placeholder (502 at once)."""

    def __init__(self, prefix: Path, listen_port: int, service: str = "web") -> None:
        from testkit.etcd_watch import render as render_upstream

        self.prefix = prefix
        self.listen_port = listen_port
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.upstream = prefix / "upstream.conf"
        self.upstream.write_text(render_upstream([], "(not rendered yet)"))
        self.pid_file = prefix / "nginx.pid"
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(
            UPSTREAM_CONF.format(
                prefix=prefix, upstream=self.upstream, listen_host="127.0.0.1", listen_port=listen_port, service=service
            )
        )
        self.proc = None

    def pid_written(self) -> bool:
        """nginx's master has written its pid file (the watcher's SIGHUP needs it)."""
        assert self.proc is not None
        try:
            return self.pid_file.read_text().split()[0] == str(self.proc.pid)
        except (OSError, IndexError):
            return False
