"""The test kit's stalled mount (testkit.stallfs) stands in for a dead NFS server: a read blocks,
and a process that dies while its read is held still exits (NFS sends nothing at the close of a
file opened for reading). Without the second property the token-file test saw a sidecar that had
finished its drain and could not exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testkit import wait_for
from testkit.stallfs import StallFS

CHILD = r"""
import sys, threading, time
f = open(sys.argv[1], "rb", buffering=0)
print("opened", flush=True)
sys.stdin.readline()  # the test stalls the mount now
threading.Thread(target=f.read, daemon=True).start()
sys.stdin.readline()  # the read is held: exit with the file open
"""


@pytest.mark.integration
def test_a_process_dies_with_its_read_held(tmp_path: Path) -> None:
    fs = StallFS(tmp_path / "mnt", b"token\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(fs.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "opened"
        fs.stall()
        proc.stdin.write("\n")
        proc.stdin.flush()
        wait_for(lambda: fs.held == 1, 10, what="the child's read to be held")
        assert proc.poll() is None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(20) == 0  # red before: it stayed in exit until the mount was closed
    finally:
        fs.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
