"""Admission control: a worker's budget of decoding memory in flight. Every upload reserves what its
header says decoding will cost (``indexer.media.decode.plan``) before a pixel is allocated; a request that
would take the worker over the budget waits briefly for others to finish, then is refused with
``OverloadedError`` (the API's 503 with Retry-After) — concurrent large uploads queue, they never OOM."""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from indexer.errors import OverloadedError


class Admission:
    def __init__(self, capacity_bytes: int, wait_s: float) -> None:
        if capacity_bytes <= 0:
            raise ValueError("the admission budget must be positive")
        self.capacity = capacity_bytes
        self.wait_s = wait_s
        self._used = 0
        self._cond = threading.Condition()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._used

    @contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        """Hold ``n`` bytes of the budget for the duration of the block. One reservation alone always
        fits (decode's own per-image budget bounds it), so a large image waits for an idle worker."""
        n = max(0, min(n, self.capacity))
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self._used + n > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OverloadedError(
                        f"this worker is decoding {self._used / 2**20:,.0f} MiB of images already; "
                        f"this one needs {n / 2**20:,.0f} MiB more (budget {self.capacity / 2**20:,.0f} MiB)",
                        retry_after=max(1, math.ceil(self.wait_s)))
                self._cond.wait(left)
            self._used += n
        try:
            yield
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()
