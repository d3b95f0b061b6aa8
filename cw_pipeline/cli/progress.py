"""Progress bars for the command line (tqdm: images, rate and ETA on stderr).

Inside Dagster runs progress is a log line every N images
(:func:`cw_pipeline.compute.features.progress_logger`); the CLI draws a bar instead when
stderr is a terminal. :class:`ImageBar` is a
``progress(done, total)`` callback, and a ``listener(label, done, total)`` for
:func:`cw_pipeline.compute.features.progress_listener` that sums several labelled jobs (the shards
of an index run) into one bar whose total grows as jobs start.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

__all__ = ["ImageBar", "bars_enabled"]


def bars_enabled(quiet: bool = False, stream: IO[str] | None = None) -> bool:
    """Whether to draw bars: not ``quiet`` and ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    if quiet:
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class ImageBar:
    """A tqdm bar counting images (rate and ETA), fed by progress callbacks.

    Use as a context manager; when ``enabled`` is False every call is a no-op.
    """

    def __init__(
        self, desc: str, *, enabled: bool = True, total: int = 0, stream: IO[str] | None = None
    ) -> None:
        self.enabled = enabled
        self._done: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        self._bar: Any = None
        if enabled:
            self._bar = tqdm(
                total=total or None,
                desc=desc,
                unit="img",
                file=sys.stderr if stream is None else stream,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def __call__(self, done: int, total: int) -> None:
        """``progress(done, total)`` of one job."""
        self.listener("", done, total)

    def listener(self, label: str, done: int, total: int) -> None:
        """``done`` of ``total`` images of the job ``label`` (jobs add up on one bar)."""
        bar = self._bar
        if bar is None:
            return
        if self._totals.get(label) != total:
            self._totals[label] = total
            bar.total = sum(self._totals.values())
        step = done - self._done.get(label, 0)
        self._done[label] = done
        if label:
            bar.set_postfix_str(label, refresh=False)
        if step:
            bar.update(step)
        else:
            bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ImageBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
