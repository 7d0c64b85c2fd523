"""Remaining-time estimates for long loops over equal items (shadow models, configurations)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """A rounded human duration: "40 s", "12 min", "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_text(elapsed: float, done: int, total: int) -> str:
    """"3/8 done, about 12 min left" from the mean time per item so far ("8/8 done" at the end)."""
    if done >= total or done <= 0:
        return f"{done}/{total} done"
    return f"{done}/{total} done, about {duration(elapsed / done * (total - done))} left"
