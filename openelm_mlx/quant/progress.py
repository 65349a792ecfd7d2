"""One progress bar per calibration phase, with tqdm's rate and ETA (as ``convert`` shows its own)."""

from __future__ import annotations

import time

from tqdm import tqdm


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.began = 0.0

    def start(self, phase: str, total: int, unit: str) -> None:
        self.done()
        self.began = time.perf_counter()
        self.bar = tqdm(total=total, desc=phase, unit=unit, leave=False, disable=not self.enabled, dynamic_ncols=True)

    def step(self, n: int = 1, **postfix: object) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.5f}" if isinstance(v, float) else v for k, v in postfix.items()})

    def done(self) -> float:
        """Close the bar; seconds the phase took."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return time.perf_counter() - self.began
