"""Set-up scripts wait, not fail, while another program holds apt's locks, and say what they wait for.

apt-get's own ``-o DPkg::Lock::Timeout`` waits for the dpkg locks only: while another
``apt-get update`` holds the lists lock, apt-get fails at once with exit 100 (a fresh cloud
machine runs unattended upgrades at boot). scripts/lib/apt-wait.sh's ``apt_get`` waits first.

Real apt-get, offline: ``apt-get update`` with a private, empty sources list and private lists
and cache directories (nothing is installed, the system's apt state is untouched). The lock is
held the way apt holds it, with fcntl (``lockf``), by a separate process.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Runs scripts and apt-get as real processes: never a unit test.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "scripts" / "lib" / "apt-wait.sh"

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # holds the lock until stdin closes
"""


def private_apt(tmp: Path) -> list[str]:
    """apt-get options for an offline `apt-get update` of its own: lists lock in tmp/lists/lock."""
    (tmp / "lists" / "partial").mkdir(parents=True)
    (tmp / "cache").mkdir()
    (tmp / "parts").mkdir()
    (tmp / "sources.list").write_text("")
    return [
        "-o", f"Dir::Etc::sourcelist={tmp / 'sources.list'}",
        "-o", f"Dir::Etc::sourceparts={tmp / 'parts'}",
        "-o", f"Dir::State::Lists={tmp / 'lists'}",
        "-o", f"Dir::Cache={tmp / 'cache'}",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


@pytest.fixture
def apt(tmp_path: Path) -> list[str]:
    return private_apt(tmp_path / "apt")


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding the lists lock (as `apt-get update` does) until its stdin is closed."""
    lock = tmp_path / "apt" / "lists" / "lock"
    argv = [sys.executable, "-c", HOLDER, str(lock)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def apt_get_via_lib(apt: list[str], lock: Path, timeout: str = "900") -> subprocess.Popen[str]:
    script = f'set -euo pipefail; . {LIB}; apt_get "$@" -qq update'
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APT_WAIT_LOCKS": str(lock), "APT_WAIT_TIMEOUT": timeout}
    env["apt_wait_who"] = "setup"
    return subprocess.Popen(
        ["bash", "-c", script, "bash", *apt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@contextlib.contextmanager
def killed_on_failure(proc: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()


def test_plain_apt_get_fails_at_once_while_the_lists_lock_is_held(
    apt: list[str], lock_holder: subprocess.Popen[str]
) -> None:
    """The control: the held lock is one apt sees, and apt-get's own dpkg lock timeout does not
    wait for it (the command scripts/setup ran before)."""
    result = subprocess.run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=600", *apt, "-qq", "update"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 100, result
    assert f"held by process {lock_holder.pid}" in result.stderr


def test_apt_get_waits_for_the_lists_lock_says_so_and_goes_on_once_released(
    tmp_path: Path, apt: list[str], lock_holder: subprocess.Popen[str]
) -> None:
    lock = tmp_path / "apt" / "lists" / "lock"
    with apt_get_via_lib(apt, lock) as proc, killed_on_failure(proc):
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert re.fullmatch(
            rf"setup: waiting for the apt lists lock {re.escape(str(lock))} held by PID {lock_holder.pid} "
            rf"\(python3?\S* -c .*\)\.\.\.\n",
            line,
        ), line
        # It waits: it cannot get past the lock until the holder lets go.
        assert proc.poll() is None, proc.stderr.read()
        assert lock_holder.stdin is not None
        lock_holder.stdin.close()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err == "setup: the apt and dpkg locks are free, going on\n"
    assert "waiting" not in err  # said once


def test_apt_get_gives_up_after_its_bound_with_a_clear_message(
    tmp_path: Path, apt: list[str], lock_holder: subprocess.Popen[str]
) -> None:
    lock = tmp_path / "apt" / "lists" / "lock"
    with apt_get_via_lib(apt, lock, timeout="1") as proc, killed_on_failure(proc):
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert re.fullmatch(
        rf"setup: gave up after 1 s waiting for the apt lists lock {re.escape(str(lock))} "
        rf"held by PID {lock_holder.pid} \(.+\)",
        err.splitlines()[-1],
    ), err
    assert lock_holder.poll() is None  # the holder keeps its lock: nothing was taken from it


def test_every_apt_get_in_scripts_waits_for_the_locks() -> None:
    """apt-get on the system's state (update, install) runs through apt_get; the private,
    lock-free downloads of scripts/install-consul and install-docker (their own lists) may not."""
    offenders = []
    for script in sorted((ROOT / "scripts").iterdir()):
        if not script.is_file():
            continue
        for n, line in enumerate(script.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.match(r"\s*(\w+=\S*\s+)*apt-get\s", code) and "apt_opts" not in code:
                offenders.append(f"{script.name}:{n}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("script", ["setup", "install-docker", "lib/apt-wait.sh", "demo"])
def test_scripts_pass_shellcheck(script: str) -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck is not installed: scripts/setup installs it (apt-get install shellcheck)"
    result = subprocess.run([shellcheck, str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
