"""What must stop the moment the ``sp-core`` command is interrupted (SIGTERM, SIGINT), not after the unwinding:
the command's signal handlers call ``stop_all()`` before they raise. A helper process that cannot answer while
it works (sglang's engine host, busy starting an engine or serving a request) registers a stop that kills it
outright; without one, the unwinding waited for it (an engine host's 10 s close grace)."""
from __future__ import annotations

from typing import Callable, List

_STOPS: List[Callable[[], None]] = []


def on_interrupt(stop: Callable[[], None]) -> None:
    """Call ``stop()`` (quick, no waiting on what it stops) when the command is interrupted."""
    if stop not in _STOPS:
        _STOPS.append(stop)


def stop_all() -> None:
    for stop in list(_STOPS):
        try:
            stop()
        except Exception:  # noqa: BLE001 - a signal handler: the interruption goes on regardless
            pass
