"""What long work shows its user: one console (tables stay readable in logs and CI) and per-stage timings."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console

from recsys.memory import PeakMemory, release

console = Console(width=max(Console().width, 150))  # tables stay readable in logs and CI


@dataclass
class Timings:
    """Wall-clock seconds and peak resident memory (MB) per stage, printed as they finish and saved with the
    run's report."""

    stages: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, int] = field(default_factory=dict)
    _memory: PeakMemory | None = field(default=None, repr=False)

    @contextmanager
    def stage(self, name: str):
        console.rule(f"[bold]{name}")
        if self._memory is None:
            self._memory = PeakMemory()
        self._memory.reset()
        t0 = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - t0, 2)
        self.peak_mb[name] = round(self._memory.peak())
        release()  # what the stage freed goes back to the system (recsys/memory.py)
        console.print(f"[dim]{name}: {self.stages[name]:.1f} s, peak {self.peak_mb[name]:,} MB resident[/dim]")
