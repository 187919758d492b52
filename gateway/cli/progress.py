"""Progress of long jobs (loads, downloads) on stderr: on a terminal, one line redrawn in place;
elsewhere (a pipe, a log file), whole lines, never a carriage return. Either way the line is
ended before anything else is printed."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO

from gateway.units import format_bytes, format_duration

# Off a terminal, a line at most this often (first and last always): a long download writes
# a line every few seconds, not two a second.
QUIET_SECONDS = 5.0
BAR = 20  # characters of the download bar


class ProgressLine:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.open = False  # a drawn line not ended yet (terminal only)
        self.last = ""
        self.last_time = -QUIET_SECONDS

    def update(self, text: str, final: bool = False) -> None:
        """Show `text` as the job's state; `final` also ends the line."""
        if self.tty:
            width = shutil.get_terminal_size().columns - 1  # the last column would wrap
            shown = text if len(text) <= width else text[: width - 1] + "…"
            self.stream.write(f"\r{shown}\x1b[K")  # erase what a longer line left
            self.open = True
            if final:
                self.end()
        else:
            now = time.monotonic()
            if text != self.last and (final or now - self.last_time >= QUIET_SECONDS):
                self.stream.write(text + "\n")
                self.last_time = now
        self.last = text
        self.stream.flush()

    def end(self) -> None:
        """End a line drawn in place, so that what follows starts on its own."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def download_text(job: dict[str, Any]) -> str:
    """mlx-community/X  [########............]  42%  240.0 KiB of 568.0 KiB  1.2 MiB/s  ETA 3s"""
    done, total = job["bytes_done"], job["bytes_total"]
    parts = [job["model"]]
    if total:
        share = min(done / total, 1.0)
        filled = round(share * BAR)
        parts += [f"[{'#' * filled}{'.' * (BAR - filled)}]", f"{share:4.0%}"]
        parts.append(f"{format_bytes(done)} of {format_bytes(total)}")
    else:
        parts.append(format_bytes(done))
    if job.get("bytes_per_second"):
        parts.append(f"{format_bytes(job['bytes_per_second'])}/s")
    if job.get("eta_seconds") is not None:
        parts.append(f"ETA {format_duration(job['eta_seconds'])}")
    if job["status"] not in ("queued", "running"):
        parts.append(job["status"])
    return "  ".join(parts)
