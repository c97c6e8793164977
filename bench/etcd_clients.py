"""Which etcd client for the etcd registry: PyPI ``aetcd`` (asyncio over gRPC) or etcd's JSON gateway
(``/v3/...`` on the client port) over aiohttp, which the sidecar already imports. Figures in docs/decisions.md.

    import time     median over --runs fresh interpreters of ``python -c 'import X'`` minus ``python -c pass``;
                    added_import: ``import aiohttp, aetcd`` minus ``import aiohttp`` (the sidecar imports aiohttp)
    RSS             VmRSS of a process that imported the client (aetcd's also holds aiohttp, as the sidecar does)
                    and did one lease grant, put and keepalive
    latency         medians of --ops puts, linearizable ranges and deletes against one member
    a member dies   3-member cluster; the client is given every endpoint; the member it talks to is killed:
                    do keepalives go on (against which member), does a watch stream end, and how is it seen

aetcd is installed ONLY into a scratch virtualenv, never into the project's:

    python3 -m venv .cache/bench-aetcd && .cache/bench-aetcd/bin/pip install aetcd aiohttp
    .venv/bin/python bench/etcd_clients.py [--runs 15] [--ops 200] [--aetcd-python .cache/bench-aetcd/bin/python]

Each client runs in a process of its own (this file with --worker) under the scratch virtualenv's
interpreter, so both share one interpreter build. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KILL_WAIT = 8.0  # seconds the worker keeps trying after the member it talks to is killed


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


class Gateway:
    """The registry's calls over etcd's JSON gateway; on a connection error it moves to the next endpoint."""

    def __init__(self, endpoints: list[str]) -> None:
        self.aiohttp: Any = importlib.import_module("aiohttp")
        self.endpoints = endpoints
        self.current = 0
        self.session: Any = None

    async def open(self) -> None:
        self.session = self.aiohttp.ClientSession(timeout=self.aiohttp.ClientTimeout(total=2))

    async def close(self) -> None:
        await self.session.close()

    async def call(self, path: str, body: dict[str, Any]) -> Any:
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            url = self.endpoints[self.current] + path
            try:
                async with self.session.post(url, json=body) as r:
                    data = await r.json(content_type=None)
                    if r.status != 200:
                        raise RuntimeError(f"{r.status} {data}")
                    return data
            except (TimeoutError, OSError, self.aiohttp.ClientError) as e:
                last = e
                self.current = (self.current + 1) % len(self.endpoints)
        raise RuntimeError(f"every endpoint failed: {last!r}")

    async def grant(self, ttl: int) -> int:
        return int((await self.call("/v3/lease/grant", {"TTL": ttl}))["ID"])

    async def put(self, key: str, value: str, lease: int = 0) -> None:
        await self.call("/v3/kv/put", {"key": b64(key), "value": b64(value), "lease": str(lease)})

    async def keepalive(self, lease: int) -> int:
        return int((await self.call("/v3/lease/keepalive", {"ID": str(lease)}))["result"].get("TTL", 0))

    async def get(self, key: str) -> int:
        return int((await self.call("/v3/kv/range", {"key": b64(key)})).get("count", 0))

    async def delete(self, key: str) -> None:
        await self.call("/v3/kv/deleterange", {"key": b64(key)})

    async def watch(self, prefix: str, events: list[str]) -> str:
        """Follow a watch stream on the current endpoint until it ends; how it ended."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        body = {"create_request": {"key": b64(prefix), "range_end": b64(end)}}
        url = self.endpoints[self.current] + "/v3/watch"
        try:
            async with self.aiohttp.ClientSession() as s, s.post(url, json=body) as r:
                async for line in r.content:
                    if line.strip():
                        events.append(line.decode()[:80])
            return "stream ended (EOF)"
        except Exception as e:
            return f"stream error: {type(e).__name__}: {e}"[:160]


class Aetcd:
    """The same calls through aetcd (one host:port: its Client takes no list of endpoints)."""

    def __init__(self, endpoints: list[str]) -> None:
        importlib.import_module("aiohttp")  # the sidecar holds it anyway: RSS counts what aetcd adds to it
        self.aetcd: Any = importlib.import_module("aetcd")
        host, port = endpoints[0].removeprefix("http://").split(":")
        self.client: Any = self.aetcd.Client(host=host, port=int(port), timeout=2)

    async def open(self) -> None:
        await self.client.connect()

    async def close(self) -> None:
        await self.client.close()

    async def grant(self, ttl: int) -> int:
        return int((await self.client.lease(ttl)).id)

    async def put(self, key: str, value: str, lease: int = 0) -> None:
        await self.client.put(key.encode(), value.encode(), lease=lease or None)

    async def keepalive(self, lease: int) -> int:
        r = await self.client.refresh_lease(lease)
        return int(getattr(r, "TTL", 0))

    async def get(self, key: str) -> int:
        return 0 if await self.client.get(key.encode()) is None else 1

    async def delete(self, key: str) -> None:
        await self.client.delete(key.encode())

    async def watch(self, prefix: str, events: list[str]) -> str:
        try:
            w = await self.client.watch_prefix(prefix.encode())
            async for ev in w:
                events.append(repr(ev)[:80])
            return "stream ended"
        except Exception as e:
            return f"stream error: {type(e).__name__}: {e}"[:160]


async def work(kind: str, endpoints: list[str], ops: int, failover: bool) -> dict[str, Any]:
    client: Gateway | Aetcd = Gateway(endpoints) if kind == "gateway" else Aetcd(endpoints)
    await client.open()
    out: dict[str, Any] = {}
    try:
        lease = await client.grant(10)
        await client.put("/bench/k", "v", lease)
        await client.keepalive(lease)
        out["rss_kib"] = rss_kib()
        if not failover:
            for name in ("put", "range", "delete"):
                times = []
                for i in range(ops):
                    key = f"/bench/lat/{i}"
                    t = time.perf_counter()
                    if name == "put":
                        await client.put(key, "v")
                    elif name == "range":
                        await client.get(key)
                    else:
                        await client.delete(key)
                    times.append(time.perf_counter() - t)
                out[name + "_ms"] = statistics.median(times) * 1000
            return out
        events: list[str] = []
        watch = asyncio.create_task(client.watch("/bench/", events))
        await client.put("/bench/w", "1")
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the member is killed
        killed_at = time.monotonic()
        log = []
        while time.monotonic() - killed_at < KILL_WAIT:
            t = time.monotonic()
            try:
                ttl = await asyncio.wait_for(client.keepalive(lease), 3)
                where = endpoints[client.current] if isinstance(client, Gateway) else endpoints[0]
                log.append(f"{t - killed_at:.1f}s ok in {time.monotonic() - t:.2f}s ttl={ttl} via {where}")
            except Exception as e:
                log.append(
                    f"{t - killed_at:.1f}s FAIL after {time.monotonic() - t:.2f}s {type(e).__name__}: {str(e)[:50]}"
                )
            await asyncio.sleep(max(0.0, 1 - (time.monotonic() - t)))  # the keepalive period, not a wait
        out["keepalives"] = log
        if watch.done():
            out["watch"] = f"{watch.result()} (events seen: {len(events)})"
        else:
            out["watch"] = f"still open after {KILL_WAIT:g}s, no error seen (events seen: {len(events)})"
            watch.cancel()
        return out
    finally:
        await client.close()


def worker(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(work(args.worker, args.endpoints.split(","), args.ops, args.failover))), flush=True)
    return 0


def import_ms(py: str, module: str, runs: int) -> float:
    def once(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([py, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ""})
        return time.perf_counter() - t

    once(f"import {module}")  # bytecode compiled once, as an installed package
    bare = statistics.median(once("pass") for _ in range(runs))
    return (statistics.median(once(f"import {module}") for _ in range(runs)) - bare) * 1000


def run_worker(py: str, kind: str, endpoints: list[str], ops: int) -> dict[str, Any]:
    argv = [py, __file__, "--worker", kind, "--endpoints", ",".join(endpoints), "--ops", str(ops)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout
    return dict(json.loads(out.splitlines()[-1]))


def failover(py: str, kind: str, workdir: Path) -> dict[str, Any]:
    from testkit.etcd import EtcdCluster

    cluster = EtcdCluster(workdir)
    proc: subprocess.Popen[str] | None = None
    try:
        cluster.start_all()
        argv = [py, __file__, "--worker", kind, "--endpoints", ",".join(cluster.endpoints), "--failover"]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert json.loads(line).get("ready"), line
        leader = cluster.leader()
        cluster.kill(cluster.members[0])  # the member the client talks to first
        proc.stdin.write("killed\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=60)
        result = dict(json.loads(out.splitlines()[-1]))
        result["killed"] = (
            f"{cluster.members[0].name} ({'the leader' if leader is cluster.members[0] else 'a follower'})"
        )
        return result
    finally:
        if proc is not None and proc.poll() is None:  # the worker failed half-way: it goes too
            proc.kill()
            proc.wait()
        cluster.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--ops", type=int, default=200)
    ap.add_argument("--aetcd-python", default=str(ROOT / ".cache" / "bench-aetcd" / "bin" / "python"))
    ap.add_argument("--worker", choices=["gateway", "aetcd"], help=argparse.SUPPRESS)
    ap.add_argument("--endpoints", help=argparse.SUPPRESS)
    ap.add_argument("--failover", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from testkit import kill_all_started
    from testkit.etcd import Etcd

    py = args.aetcd_python
    work_dir = Path(tempfile.mkdtemp(prefix="bench-etcd-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind, module in (("gateway", "aiohttp"), ("aetcd", "aetcd")):
            results[kind] = {"import_ms": import_ms(py, module, args.runs)}
        # What each adds to a sidecar that imports aiohttp already: the gateway needs nothing more.
        results["gateway"]["added_import_ms"] = 0.0
        results["aetcd"]["added_import_ms"] = (
            import_ms(py, "aiohttp, aetcd", args.runs) - results["gateway"]["import_ms"]
        )
        member = Etcd(work_dir)
        member.start()
        for kind in ("gateway", "aetcd"):
            results[kind].update(run_worker(py, kind, [member.endpoint], args.ops))
        member.stop()
        for kind in ("gateway", "aetcd"):
            (work_dir / kind).mkdir()
            results[kind].update(failover(py, kind, work_dir / kind))
    finally:
        kill_all_started()
    base = results["gateway"]
    print(f"{'':16}{'gateway (aiohttp)':>20}{'aetcd':>14}{'aetcd/gateway':>16}")
    for key in ("import_ms", "added_import_ms", "rss_kib", "put_ms", "range_ms", "delete_ms"):
        a, g = results["aetcd"][key], base[key]
        print(f"{key:16}{g:>20.1f}{a:>14.1f}{(a / g if g else float('inf')):>16.2f}")
    for kind in ("gateway", "aetcd"):
        r = results[kind]
        print(f"\n{kind}: killed {r['killed']}\n  watch: {r['watch']}")
        for line in r["keepalives"]:
            print("  keepalive " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
