"""The proof picture: both runs of a rollout in one figure (examples/rollout/timeline.plot_comparison).

Pure drawing, no processes: synthetic per-request records with known failures and marks.
"""

from __future__ import annotations

from pathlib import Path

from examples.rollout.loadgen import Record
from examples.rollout.timeline import MARK_STYLES, Panel, plot_comparison


def records(seconds: float, rate: float, failing: list[tuple[float, float]]) -> list[Record]:
    out = []
    for i in range(int(seconds * rate)):
        t = i / rate
        failed = any(a <= t < b for a, b in failing)
        version = "v1" if t < seconds / 2 else "v2"
        out.append(
            Record(
                t,
                0.002,
                None if failed else 200,
                "ClientConnectorError: refused" if failed else None,
                None if failed else f"host {version}",
                t,
            )
        )
    return out


def marks(at: list[float]) -> list[tuple[float, str, str]]:
    out = []
    for i, t in enumerate(at, 1):
        out += [
            (t - 2, f"v2 #{i} passing", "passing"),
            (t, f"v1 #{i} stop", "stop"),
            (t + 0.01, f"v1 #{i} dereg. confirmed", "deregistered"),
            (t + 3, f"v1 #{i} app signalled", "signalled"),
        ]
    return out


def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_both_runs_share_axes_and_nothing_is_clipped_or_hidden(tmp_path: Path) -> None:
    """A long sidecar run (60 s, no failures) and a shorter naive one (40 s, failure bursts) with
    four kinds of marks each. Expected: one PNG; the same x range (covering both runs and every
    mark) and the same y scales in every run's panels; every mark label inside the figure; the
    legend and the caption below all plots, covering none of them."""
    sidecar = Panel("sidecar", records(60, 100, []), marks([10, 25, 40]), (8, 50))
    naive = Panel("naive", records(40, 100, [(10, 11.5), (20, 21.5), (30, 32)]), marks([10, 20, 30]), (8, 35))
    path = tmp_path / "both.png"
    layout = plot_comparison([sidecar, naive], path, "title", caption="why the naive failures go on " * 10)

    assert path.stat().st_size > 20_000
    assert len(set(layout.x_limits)) == 1
    x0, x1 = layout.x_limits[0]
    assert x0 <= 0 and x1 >= 60 and x1 >= max(t for t, _, _ in sidecar.marks)
    assert len(set(layout.ok_limits)) == 1 and len(set(layout.failed_limits)) == 1
    assert layout.failed_limits[0][1] >= 100, "the naive bursts (100 failed/s) must fit the failure scale"

    width, height = layout.size
    assert len(layout.labels) == len(sidecar.marks) + len(naive.marks)
    for box in layout.labels:
        assert box[0] >= 0 and box[2] <= width and box[1] >= 0 and box[3] <= height, f"label clipped: {box}"
    for axes in layout.axes:
        assert not overlaps(layout.legend, axes), "the legend covers a plot"
        assert layout.caption is not None and not overlaps(layout.caption, axes), "the caption covers a plot"
    assert layout.caption is not None and not overlaps(layout.caption, layout.legend)
    assert set(MARK_STYLES) == {"passing", "stop", "deregistered", "signalled"}
