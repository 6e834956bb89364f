"""The real clock, for production wiring (tests may pass their own `Clock`)."""

from __future__ import annotations

import time


class SystemClock:
    """Wall-clock milliseconds since the epoch."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000
