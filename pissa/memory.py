"""How much memory this process has used: what init, train and the benchmarks report.

Two measures, because they answer different questions: the peak resident set (ru_maxrss, what the
OS counts against the process, file pages it maps included) and the peak of anonymous memory
(RssAnon on Linux: the process's own allocations; memory-mapped weight files are file pages, which
the kernel can drop and read again, so they do not grow with what the process holds).
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def anon_mib() -> float | None:
    """The process's anonymous resident memory now (Linux's RssAnon), or None where the OS does
    not report it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class AnonPeak:
    """The peak of anonymous resident memory over a block, sampled every `interval` seconds by a
    thread (the kernel keeps no such peak): `with AnonPeak() as p: ...; p.mib`. None where the OS
    does not report anonymous memory. A peak shorter than the interval can be missed; the
    benchmarks use 5 ms, against allocations that live for seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.mib = interval, anon_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = anon_mib()
            if now is not None and (self.mib is None or now > self.mib):
                self.mib = now

    def __enter__(self) -> "AnonPeak":
        if self.mib is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.mib is not None:
            self._stop.set()
            self._thread.join()
            now = anon_mib()
            self.mib = max(self.mib, now or 0.0)
