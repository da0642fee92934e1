"""Logging for every module, vLLM-free: loggers under vLLM's ``vllm`` tree, and rate-limited warnings (a pool outage
must be visible in the log without flooding it once per step)."""

from __future__ import annotations

import logging
import threading
import time


def init_logger(name: str) -> logging.Logger:
    """A logger under the ``vllm`` tree, so our lines get vLLM's handlers, format and level in its processes; the data
    plane uses it without importing vLLM."""
    return logging.getLogger(f"vllm.{name}")


class OncePerReason:
    """Log a line at INFO the first time its reason comes up: an explanation (why a kind of request is never served
    from the pool, say) that a reader needs once per engine, not once per request."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._said: set[str] = set()

    def __call__(self, reason: str, msg: str, *args: object) -> None:
        if reason not in self._said:
            self._said.add(reason)
            self._logger.info(msg, *args)


class RateLimitedWarning:
    """Emit a warning for a given reason at most once per ``interval_s``; counts what it held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 30.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, reason: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self._interval_s:
                self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                return
            self._last[reason] = now
            held = self._suppressed.pop(reason, 0)
        suffix = f" ({held} similar warnings suppressed)" if held else ""
        self._logger.warning(msg + suffix, *args)
