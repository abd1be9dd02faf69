"""How a training loop shows its progress: tqdm's bar in a terminal, a status line now and then in a log.

    with Progress(total_steps, initial=state.step, desc="fine-tuning") as progress:
        for ...:
            progress.update(loss="0.4312", lr="4.1e-05")

A bar redraws itself in place on a terminal, but written to a file every redraw is a line of its own:
`make finetune > log 2>&1` wrote more than 1,500 lines for 789 steps. So the bar is drawn only where it
goes to a terminal (stderr), and where minibert's log (stdout) is not a terminal, a status line is
logged instead, at most every STATUS_SECONDS and once at the last step. Log lines written while the bar
is drawn go above it, not through it.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger("minibert")

STATUS_SECONDS = 30.0


class Progress:
    def __init__(self, total: int, *, initial: int = 0, desc: str = "training", enabled: bool = True):
        self.total, self.step, self.desc = total, initial, desc
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=not (enabled and sys.stderr.isatty()))
        self.status_lines = enabled and (self.bar.disable or not sys.stdout.isatty())
        self.first_step, self.started = initial, time.monotonic()
        self.last_status = self.started
        self._redirect = None

    def __enter__(self) -> Progress:
        if not self.bar.disable:
            self._redirect = logging_redirect_tqdm(loggers=[logging.root])
            self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)

    def update(self, **figures: str) -> None:
        """One step done; `figures` (loss="0.4312", ...) are shown beside the count."""
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix(figures, refresh=False)
        now = time.monotonic()
        if self.status_lines and (now - self.last_status >= STATUS_SECONDS or self.step == self.total):
            self.last_status = now
            elapsed = now - self.started
            left = elapsed / (self.step - self.first_step) * (self.total - self.step)
            logger.info("minibert: %s step %d/%d, %s, %s elapsed, %s left", self.desc, self.step, self.total,
                        ", ".join(f"{name} {value}" for name, value in figures.items()), _duration(elapsed),
                        _duration(left))


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
