"""A small progress bar on stderr: `desc  12/50 [#####...............] 1.23 s/it  postfix`."""

import sys
import time

WIDTH = 20  # characters in the bar


class Progress:
    """Wraps an iterable and ticks once per item; `set_postfix` adds text (e.g. a loss) to the line."""

    def __init__(self, iterable, total: int | None = None, desc: str = "sampling", enabled: bool = True):
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, text: str) -> None:
        self.postfix = text

    def _line(self, done: int, elapsed: float) -> str:
        count, bar = f"{done}", ""
        if self.total:
            filled = WIDTH * min(done, self.total) // self.total
            count, bar = f"{done}/{self.total}", " [" + "#" * filled + "." * (WIDTH - filled) + "]"
        seconds = elapsed / max(done, 1)
        rate = f"{seconds:.2f} s/it" if seconds >= 1 else f"{1 / max(seconds, 1e-9):.2f} it/s"
        return f"{self.desc}  {count}{bar} {rate}" + (f"  {self.postfix}" if self.postfix else "")

    def __iter__(self):
        if not self.enabled:
            yield from self.iterable
            return
        # A terminal gets one line redrawn in place; a log file gets a line per tenth, so it stays short.
        tty, start, done, shown = sys.stderr.isatty(), time.perf_counter(), 0, 0
        try:
            for item in self.iterable:
                yield item
                done += 1
                line = self._line(done, time.perf_counter() - start)
                if tty:
                    print("\r" + line + "\x1b[K", end="", file=sys.stderr, flush=True)  # erase a longer old line
                elif self.total and done * 10 // self.total > shown * 10 // self.total:
                    print(line, file=sys.stderr, flush=True)
                    shown = done
        finally:  # also when the loop is left early
            if tty and done:
                print(file=sys.stderr, flush=True)
            elif not tty and done != shown:
                print(self._line(done, time.perf_counter() - start), file=sys.stderr, flush=True)
