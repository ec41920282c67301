"""Progress reporting shared by training and the influence engine.

Long loops call ``progress(stage, done, total)``; the CLI turns that into tqdm bars, the app into
``st.progress``. ``done``/``total`` count batches, samples or iterations of ``stage``.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


class TqdmProgress:
    """A ``Progress`` that shows one tqdm bar per stage (for the CLI)."""

    def __init__(self, **tqdm_kwargs):
        self._bar = None
        self._stage = None
        self._kwargs = tqdm_kwargs

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bar
        if stage != self._stage or bar is None:
            self.close()
            self._stage = stage
            bar = self._bar = tqdm(total=total, desc=stage, leave=True, dynamic_ncols=True, **self._kwargs)
        bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def tagged(progress: Progress | None, tag: str) -> Progress | None:
    """``progress`` with every stage name prefixed by ``tag`` (``"tag: stage"``); None stays None."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{tag}: {stage}", done, total)
