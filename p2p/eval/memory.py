"""Peak memory of a stretch of work, above where it started: CUDA's allocator statistics, or on
a CPU, which has no per-run peak counter, the process's resident set sampled every 5 ms."""
import os
import threading
from pathlib import Path

import torch


def rss() -> int:
    """Resident bytes of this process (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """with PeakMemory(device) as m: ...  then m.mib. On CUDA the work is synchronised at both
    ends, so time taken around the block counts the kernels too."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.peak, self.done = rss(), 0, threading.Event()
            self.thread = threading.Thread(target=self.watch, daemon=True)
            self.thread.start()
        return self

    def watch(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, rss() - self.base)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.done.set()
            self.thread.join()
            self.mib = max(self.peak, rss() - self.base) / 2 ** 20
