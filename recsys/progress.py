"""What long work shows its user: one console (tables stay readable in logs and CI) and per-stage timings."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console

from recsys.memory import release

console = Console(width=max(Console().width, 150))  # tables stay readable in logs and CI


@dataclass
class Timings:
    """Wall-clock seconds per stage, printed as they finish and saved with the run's report."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - t0, 2)
        release()  # what the stage freed goes back to the system (recsys/memory.py)
        console.print(f"[dim]{name}: {self.stages[name]:.1f} s[/dim]")
