"""Progress of long steps (torch-free): a tqdm bar when tqdm is installed and the step is
worth showing, else nothing; log lines are routed above the bar while it is open.

    with Progress(len(images), "export gates", unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

`timed_step` logs what a step without measurable progress (a torch.onnx export, onnxslim, a
TensorRT build) is doing, then how long it took.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)


class Progress:
    """A transient tqdm bar on stderr (`enabled=False`, or no tqdm: does nothing).

    Attributes:
        bar: the tqdm bar, or None.
    """

    def __init__(
        self, total: int | None, desc: str, *, unit: str = "it", enabled: bool = True
    ) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.bar: Any = None
        self._redirect: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        try:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
        except ImportError:
            return self
        self.bar = tqdm(
            total=self.total,
            desc=self.desc,
            unit=self.unit,
            dynamic_ncols=True,
            leave=False,
            mininterval=0.5,
        )
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        return self

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def note(self, text: str) -> None:
        """What the step does now, beside the bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self._redirect.__exit__(*exc)
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def timed_step(what: str, log: logging.Logger | None = None) -> Iterator[None]:
    """Log "`what` ..." before a step whose progress cannot be measured, and "`what`: N s"
    after it."""
    log = log or logger
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - start)
