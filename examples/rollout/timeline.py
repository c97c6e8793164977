"""Timeline plot of a load run: successful requests per second by version, failed ones below.

matplotlib is imported inside ``plot_timeline`` only, so that the load
client works without it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .loadgen import Record

# 12 x 7 inches at 100 dpi = 1200 x 700 px.
_SIZE_INCHES = (12.0, 7.0)
_DPI = 100
# Colours for versions in sorted order (matplotlib's tab10 without red, which
# is kept for failures), and reds for the kinds of failure.
_VERSION_COLOURS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#e377c2", "#7f7f7f")
_FAILURE_COLOURS = ("#d62728", "#ff9896", "#8b0000", "#f08080", "#b22222", "#ffb3b3")
_OTHER_FAILURES = "other"


_BIN_CHOICES = (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_MAX_BINS = 100


def _load_end(records: Sequence[Record]) -> float:
    """When the load ended: the last start plus the mean gap between starts."""
    starts = sorted(r.start for r in records)
    if not starts:
        return 0.0
    gap = (starts[-1] - starts[0]) / (len(starts) - 1) if len(starts) > 1 else 0.0
    return starts[-1] + gap


def _edges(end: float, width: float) -> list[float]:
    """0, width, 2*width, ... up to `end`, which is the last edge; a last
    partial bin shorter than a quarter of `width` is merged into the one before."""
    edges = [0.0]
    while edges[-1] + width < end - 1e-9:
        # round(): 3 * 0.1 is 0.30000000000000004, which would put a start
        # at exactly 0.3 in the wrong bin.
        edges.append(round(len(edges) * width, 9))
    if len(edges) > 1 and end - edges[-1] < 0.25 * width:
        edges.pop()
    edges.append(max(end, edges[-1] + 1e-6))
    return edges


def _rates(starts: Sequence[float], edges: Sequence[float]) -> list[float]:
    """Starts per second in each bin between consecutive edges."""
    counts = [0] * (len(edges) - 1)
    for s in starts:
        i = bisect.bisect_right(edges, s) - 1
        if 0 <= i < len(counts):
            counts[i] += 1
        elif i == len(counts) and s <= edges[-1] + 1e-9:
            counts[-1] += 1
    return [c / (b - a) for c, a, b in zip(counts, edges, edges[1:])]


def _active_only(ys: list[float]) -> list[float]:
    """NaN outside one bin either side of the nonzero values, so that a version's line
    starts and ends where the version served (and does not lie on the axis)."""
    nonzero = [i for i, y in enumerate(ys) if y > 0]
    if not nonzero:
        return [math.nan] * len(ys)
    lo, hi = max(nonzero[0] - 1, 0), min(nonzero[-1] + 1, len(ys) - 1)
    return [y if lo <= i <= hi else math.nan for i, y in enumerate(ys)]


def _auto_bin(span: float) -> float:
    for width in _BIN_CHOICES:
        if span / width <= _MAX_BINS:
            return width
    return _BIN_CHOICES[-1]


def plot_timeline(
    records: Sequence[Record],
    marks: Sequence[tuple[float, str]],
    path: Path,
    title: str,
    *,
    bin_seconds: float | None = None,
) -> None:
    """Write a 1200x700 PNG of ``records`` to ``path``.

    Top: successful (not failed) requests per second, one line per version
    (the last word of X-Backend), and all requests sent per second (dashed).
    Bottom: failed requests per second, stacked bars in reds by kind.
    Each ``(seconds, label)`` mark is a dotted vertical line through both
    panels, labelled at the top.  Rates are counted in bins of
    ``bin_seconds`` (default: 0.1 s to 60 s, about 100 bins over the run)
    and always given per second; the last bin ends where the load ended.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    end = _load_end(records)
    x_max = max([end, *(t for t, _ in marks)])
    if x_max <= 0:
        x_max = 1.0
    width = _auto_bin(end) if bin_seconds is None else bin_seconds
    if not width > 0:
        raise ValueError(f"bin_seconds must be positive: {bin_seconds!r}")
    edges = _edges(end if end > 0 else x_max, width)
    lefts = edges[:-1]
    widths = [b - a for a, b in zip(edges, edges[1:])]

    def key(r: Record) -> str:
        return r.version or "?"

    ok = [r for r in records if not r.failed]
    versions = sorted({key(r) for r in ok})
    ok_by_version = {v: _active_only(_rates([r.start for r in ok if key(r) == v], edges)) for v in versions}
    sent = _rates([r.start for r in records], edges)

    # Failure kinds, most frequent first; beyond the available reds the rest
    # are lumped together as "other".
    failed = [r for r in records if r.failed]
    ranked = Counter(r.failure_kind or "?" for r in failed).most_common()
    shown = ranked if len(ranked) <= len(_FAILURE_COLOURS) else ranked[: len(_FAILURE_COLOURS) - 1]
    shown_kinds = {k for k, _ in shown}

    def kind_of(r: Record) -> str:
        k = r.failure_kind or "?"
        return k if k in shown_kinds else _OTHER_FAILURES

    kind_counts = Counter(kind_of(r) for r in failed)
    kinds = [k for k, _ in shown] + ([_OTHER_FAILURES] if _OTHER_FAILURES in kind_counts else [])
    failed_by_kind = {k: _rates([r.start for r in failed if kind_of(r) == k], edges) for k in kinds}

    total = len(records)
    bins_text = f"{width:g} s bins"

    def steps(ys: list[float]) -> list[float]:
        return [*ys, ys[-1]]

    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10}):
        fig, (top, bottom) = plt.subplots(
            2,
            1,
            sharex=True,
            figsize=_SIZE_INCHES,
            dpi=_DPI,
            gridspec_kw={"height_ratios": [2.2, 1.0], "hspace": 0.08},
        )
        fig.suptitle(title, fontsize=14, fontweight="bold")

        top.step(
            edges, steps(sent), where="post", color="#666666", linestyle="--", linewidth=1.3, label="sent", zorder=3
        )
        for i, v in enumerate(versions):
            colour = _VERSION_COLOURS[i % len(_VERSION_COLOURS)]
            top.step(
                edges, steps(ok_by_version[v]), where="post", color=colour, linewidth=2.4, label=f"{v} ok", zorder=2
            )
        top.set_ylabel(f"successful requests / s\n({bins_text})")
        top.set_ylim(0, max([*sent, 1.0]) * 1.3)
        top.grid(True, alpha=0.3)
        top.legend(loc="upper left", ncol=len(versions) + 1, framealpha=0.95)

        base = [0.0] * len(lefts)
        for j, k in enumerate(kinds):
            ys = failed_by_kind[k]
            bottom.bar(
                lefts,
                ys,
                width=widths,
                bottom=base,
                align="edge",
                color=_FAILURE_COLOURS[j],
                linewidth=0,
                label=f"{k} ({kind_counts[k]})",
            )
            base = [b + y for b, y in zip(base, ys)]
        bottom.set_ylim(0, max(max(base, default=0.0) * 1.3, 1.0))
        bottom.set_ylabel("failed requests / s", color="#b00000")
        bottom.set_xlabel("seconds since the load began")
        bottom.grid(True, alpha=0.3)
        n_failed = len(failed)
        if n_failed:
            summary = f"{n_failed} failed of {total} ({n_failed / total * 100:.2f} %)"
            bottom.legend(loc="upper left", framealpha=0.95, title=summary, title_fontsize=10, alignment="left")
        else:
            bottom.text(
                0.5,
                0.5,
                f"no failed requests (of {total})",
                transform=bottom.transAxes,
                ha="center",
                va="center",
                color="#2ca02c",
                fontsize=12,
            )
        top.set_xlim(0, x_max)
        fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.09)

        # Marks: a line through both panels, the label rotated along the line
        # near the top; labels closer than a text height are nudged apart.
        px_per_second = top.get_window_extent().width / x_max
        min_gap = 16.0 / px_per_second
        trans = blended_transform_factory(top.transData, top.transAxes)
        last_x = -math.inf
        for t, label in sorted(marks):
            for ax in (top, bottom):
                ax.axvline(t, color="#333333", linestyle=":", linewidth=1.2, zorder=1)
            x = max(t, last_x + min_gap)
            last_x = x
            top.text(
                x + 2.0 / px_per_second,
                0.97,
                label,
                transform=trans,
                rotation=90,
                ha="left",
                va="top",
                fontsize=9.5,
                color="#222222",
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )

        fig.savefig(path, dpi=_DPI)
        plt.close(fig)


# --- both runs in one figure -------------------------------------------------------------------

# Mark kinds: colour, line style, legend text.
MARK_STYLES: dict[str, tuple[str, str, str]] = {
    "passing": ("#9467bd", "-", "new instance passing in the registry"),
    "stop": ("#333333", ":", "stop sent to the old container/instance"),
    "deregistered": ("#1f77b4", "--", "deregistration confirmed"),
    "signalled": ("#ff7f0e", "-.", "app signalled (SIGTERM)"),
}


@dataclass(frozen=True)
class Panel:
    """One run: its title, its requests, its marks ``(seconds, label, kind)`` (kind a key of
    MARK_STYLES) and the rollout's ``(start, end)``, shaded."""

    title: str
    records: Sequence[Record]
    marks: Sequence[tuple[float, str, str]]
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class Layout:
    """Where plot_comparison put things, in pixels of the saved figure ((x0, y0, x1, y1) boxes),
    and each run's axis limits: what a test needs to check that nothing is clipped or hidden."""

    size: tuple[float, float]
    x_limits: list[tuple[float, float]]
    ok_limits: list[tuple[float, float]]
    failed_limits: list[tuple[float, float]]
    axes: list[tuple[float, float, float, float]]
    labels: list[tuple[float, float, float, float]]
    legend: tuple[float, float, float, float]
    caption: tuple[float, float, float, float] | None


def plot_comparison(
    panels: Sequence[Panel], path: Path, title: str, *, caption: str = "", bin_seconds: float | None = None
) -> Layout:
    """Write one PNG with every run on a shared time axis, bin width and y scales.

    Per run, two rows: successful requests per second by version (with all sent, dashed),
    and failed requests per second by kind. Marks are vertical lines styled by kind, each
    labelled (rotated) in a band kept free above the data, so no label covers a curve; the
    legends sit outside the plotting area, under the last run, and ``caption`` under them.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    ends = [_load_end(p.records) for p in panels]
    x_max = max([*ends, *(t for p in panels for t, _, _ in p.marks), 1.0])
    width = _auto_bin(x_max) if bin_seconds is None else bin_seconds
    edges = _edges(x_max, width)
    lefts = edges[:-1]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    versions = sorted({r.version or "?" for p in panels for r in p.records if not r.failed})
    colour_of = {v: _VERSION_COLOURS[i % len(_VERSION_COLOURS)] for i, v in enumerate(versions)}
    kinds = [k for k, _ in Counter(r.failure_kind or "?" for p in panels for r in p.records if r.failed).most_common()]
    if len(kinds) > len(_FAILURE_COLOURS):
        kinds = kinds[: len(_FAILURE_COLOURS) - 1] + [_OTHER_FAILURES]
    red_of = {k: _FAILURE_COLOURS[i] for i, k in enumerate(kinds)}

    def kind_of(r: Record) -> str:
        k = r.failure_kind or "?"
        return k if k in red_of else _OTHER_FAILURES

    data = []
    for p, end in zip(panels, ends):
        # A shorter run's lines stop where its load stopped (not drop to zero).
        def within(ys: list[float], end: float = end) -> list[float]:
            return [y if a < end - 1e-9 else math.nan for y, a in zip(ys, lefts)]

        sent = within(_rates([r.start for r in p.records], edges))
        ok = {
            v: within(
                _active_only(_rates([r.start for r in p.records if not r.failed and (r.version or "?") == v], edges))
            )
            for v in versions
        }
        fails = {k: _rates([r.start for r in p.records if r.failed and kind_of(r) == k], edges) for k in kinds}
        data.append((sent, ok, fails))
    ok_top = max([max((y for y in sent if not math.isnan(y)), default=0.0) for sent, _, _ in data] + [1.0])
    fail_top = max([max((sum(v) for v in zip(*f.values())), default=0.0) if f else 0.0 for _, _, f in data] + [1.0])

    n = len(panels)
    caption_lines = textwrap.wrap(caption, 150) if caption else []
    height = 1.2 + 4.6 * n + 0.9 + 0.22 * len(caption_lines)
    with plt.rc_context({"font.size": 10.5, "axes.titlesize": 11.5, "legend.fontsize": 9.5}):
        fig = plt.figure(figsize=(13.0, height), dpi=_DPI)
        grid = fig.add_gridspec(
            2 * n,
            1,
            height_ratios=[2.6, 1.0] * n,
            hspace=0.12,
            top=1 - 0.9 / height,
            bottom=(1.05 + 0.22 * len(caption_lines)) / height,
            left=0.07,
            right=0.985,
        )
        fig.suptitle(title, fontsize=13, fontweight="bold")
        axes: list[Any] = []
        for i, (p, (sent, ok, fails)) in enumerate(zip(panels, data)):
            top = fig.add_subplot(grid[2 * i], sharex=axes[0] if axes else None)
            bottom = fig.add_subplot(grid[2 * i + 1], sharex=top)
            axes += [top, bottom]
            if p.window is not None:
                for ax in (top, bottom):
                    ax.axvspan(*p.window, color="#f2f2f2", zorder=0)
            top.step(edges, [*sent, sent[-1]], where="post", color="#666666", linestyle="--", linewidth=1.2, zorder=3)
            for v in versions:
                ys = ok[v]
                top.step(edges, [*ys, ys[-1]], where="post", color=colour_of[v], linewidth=2.2, zorder=2)
            # The upper half of the panel is the band for the marks' labels.
            top.set_ylim(0, ok_top * 2.05)
            top.set_ylabel(f"ok requests / s\n({width:g} s bins)")
            top.set_title(p.title, loc="left", fontweight="bold")
            top.grid(True, alpha=0.3)
            top.tick_params(labelbottom=False)
            base = [0.0] * len(lefts)
            for k in kinds:
                bottom.bar(lefts, fails[k], width=widths, bottom=base, align="edge", color=red_of[k], linewidth=0)
                base = [b + y for b, y in zip(base, fails[k])]
            bottom.set_ylim(0, fail_top * 1.15)
            bottom.set_ylabel("failed / s", color="#b00000")
            bottom.grid(True, alpha=0.3)
            if not any(r.failed for r in p.records):
                bottom.text(
                    0.5,
                    0.5,
                    f"no failed requests (of {len(p.records)})",
                    transform=bottom.transAxes,
                    ha="center",
                    va="center",
                    color="#2ca02c",
                    fontsize=11,
                )
            if i < n - 1:
                bottom.tick_params(labelbottom=False)
        axes[0].set_xlim(0, x_max * 1.01)
        axes[-1].set_xlabel("seconds since the load began (shaded: the rollout)")

        for i, p in enumerate(panels):
            top, bottom = axes[2 * i], axes[2 * i + 1]
            px_per_second = top.get_window_extent().width / (x_max * 1.01)
            min_gap = 13.0 / px_per_second
            trans = blended_transform_factory(top.transData, top.transAxes)
            last_x = -math.inf
            for t, label, kind in sorted(p.marks):
                colour, style, _ = MARK_STYLES.get(kind, ("#333333", ":", kind))
                for ax in (top, bottom):
                    ax.axvline(t, color=colour, linestyle=style, linewidth=1.1, zorder=1)
                x = max(t, last_x + min_gap)
                last_x = x
                top.text(
                    x + 1.5 / px_per_second,
                    0.985,
                    label,
                    transform=trans,
                    rotation=90,
                    ha="left",
                    va="top",
                    fontsize=7.5,
                    color=colour,
                    clip_on=False,
                    bbox={"boxstyle": "square,pad=0.05", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
                )

        handles: list[Any] = [Line2D([], [], color="#666666", linestyle="--", label="sent")]
        handles += [Line2D([], [], color=colour_of[v], linewidth=2.2, label=f"{v} ok") for v in versions]
        handles += [Line2D([], [], color=c, linestyle=s, label=text) for c, s, text in MARK_STYLES.values()]  # type: ignore[arg-type]  # the styles are valid line styles
        handles += [Patch(color=red_of[k], label=f"failed: {k}") for k in kinds]
        legend = fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 5),
            frameon=False,
            bbox_to_anchor=(0.5, (0.12 + 0.22 * len(caption_lines)) / height),
        )
        note = None
        if caption_lines:
            note = fig.text(
                0.07, 0.1 / height, "\n".join(caption_lines), ha="left", va="bottom", fontsize=9.5, color="#333333"
            )
        fig.savefig(path, dpi=_DPI)
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]  # Agg canvas

        def box(artist: Any) -> tuple[float, float, float, float]:
            b = artist.get_window_extent(renderer)
            return (float(b.x0), float(b.y0), float(b.x1), float(b.y1))

        layout = Layout(
            size=(float(fig.bbox.width), float(fig.bbox.height)),
            x_limits=[tuple(ax.get_xlim()) for ax in axes[0::2]],
            ok_limits=[tuple(ax.get_ylim()) for ax in axes[0::2]],
            failed_limits=[tuple(ax.get_ylim()) for ax in axes[1::2]],
            axes=[box(ax) for ax in axes],
            labels=[box(t) for ax in axes[0::2] for t in ax.texts if t.get_rotation() == 90],
            legend=box(legend),
            caption=None if note is None else box(note),
        )
        plt.close(fig)
        return layout
