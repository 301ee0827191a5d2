"""The folder of a sweep or a benchmark, shared by many processes, and what both run in it: cells
(one experiment record each), checked before the model loads; which cells a process takes (its
shard: --shard K/N, torchrun's RANK/WORLD_SIZE or a SLURM array's variables); the results files it
appends each finished cell to and resumes from, its lock on its shard while it runs; the metrics'
networks; and the tables' figures, written whole or not at all.
p2p/eval/sweep.py and p2p/eval/pie.py each make their cells, run one, and tabulate the results.
"""
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tqdm import tqdm

from models import InputError
from models.checkpoint import StableDiffusion, load

from . import run
from .record import Experiment


@dataclass(frozen=True)
class Cell:
    index: int                                # its place in the grid's fixed order: shards take index % N
    case: str                                 # a sweep's case name, a benchmark's photo id
    axes: tuple[tuple[str, object], ...]      # (field, JSON value) in the spec's order
    record: Experiment                        # as the spec gives it: fields left to the model are None

    @cached_property
    def key(self) -> str:
        """16 hex digits naming the cell by its record alone, so a changed spec never reuses a result."""
        return hashlib.sha256(json.dumps(self.record.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def tile(cell: Cell, name: str) -> str:
    """One of a cell's images (source, target0, photo, ...), relative to the folder, as run.write names
    it for the Outputs tiles=OUT/cells/KEY."""
    return f"cells/{cell.key}.{name}.png"


@dataclass(frozen=True)
class Job:
    """What a run of a grid needs besides its cells; p2p/commands.py builds it from the flags."""
    weights: Path | None
    out: Path                                 # the folder: results*.jsonl, cells/, the tables
    shard: tuple[int, int] = (0, 1)           # (K, N) from shard_of
    load_model: Callable[[], StableDiffusion] | None = None   # called only when a cell is left to run
    clip: Path | None = None                  # the metrics' networks (None: not measured)
    dino: Path | None = None
    lpips: Path | None = None
    prediction: str | None = None             # what the UNet predicts, where the checkpoint cannot say

    def architecture(self) -> StableDiffusion:
        """The checkpoint's architecture, read off its headers (no weights are read)."""
        return load(self.weights, "meta", prediction=self.prediction)


def shard_of(text: str | None) -> tuple[int, int]:
    """(K, N): from --shard K/N, else torchrun's RANK/WORLD_SIZE, else a SLURM array's task id
    (less its minimum) among its count, else (0, 1). Each value is named where it is wrong."""
    env = os.environ

    def number(name: str, value: str) -> int:
        try:
            return int(value)
        except ValueError:
            raise InputError(f"{name}={value!r}: not an integer") from None

    if text is not None:
        try:
            k, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise InputError(f"--shard takes K/N, e.g. 0/4, got {text!r}") from None
        given = f"--shard {text}"
    elif "RANK" in env and "WORLD_SIZE" in env:
        k, n = number("RANK", env["RANK"]), number("WORLD_SIZE", env["WORLD_SIZE"])
        given = f"RANK={k} WORLD_SIZE={n}"
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task, low = (number(v, env.get(v, "0")) for v in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN"))
        k, n = task - low, number("SLURM_ARRAY_TASK_COUNT", env["SLURM_ARRAY_TASK_COUNT"])
        given = f"SLURM_ARRAY_TASK_ID={task} SLURM_ARRAY_TASK_MIN={low} SLURM_ARRAY_TASK_COUNT={n}"
    else:
        k, n = 0, 1
        given = ""
    if not 0 <= k < n:
        raise InputError(f"{given}: shard {k} of {n}; need 0 <= K < N")
    return k, n


def refusals(every: list[Cell], weights: Path, architecture: StableDiffusion) -> Iterator[tuple[Cell, InputError]]:
    """Each cell run.prepare refuses, with why: every cell's words, sizes, photo and layers checked
    before the model loads, against its `architecture` (Job.architecture). Cells that differ only in
    their seed are checked once."""
    checked = {}
    for cell in tqdm(every, desc="checking cells", file=sys.stderr, disable=len(every) < 1000):
        unseeded = json.dumps({**cell.record.to_json(), "seed": 0}, sort_keys=True)
        if unseeded not in checked:
            try:
                run.prepare(cell.record, weights, model=architecture)   # (out/inversions is made later)
                checked[unseeded] = None
            except InputError as e:
                checked[unseeded] = e
        if checked[unseeded] is not None:
            yield cell, checked[unseeded]


# ---- the folder ----------------------------------------------------------------------------

def results_file(out: Path, shard: tuple[int, int]) -> Path:
    k, n = shard
    return out / ("results.jsonl" if n == 1 else f"results.{k}-of-{n}.jsonl")


def read_results(out: Path) -> dict[str, dict]:
    """Every finished cell of every results file, by key; a torn last line (a killed run) is skipped."""
    done = {}
    for path in sorted(out.glob("results*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines()):
            try:
                row = json.loads(line)
                done[row["key"]] = row
            except (ValueError, KeyError):
                print(f"note: {path.name} line {n + 1} is not a finished cell (a run stopped while writing?); "
                      "it will be run again", file=sys.stderr)
    return done


def append(path: Path, row: dict):
    """One line, flushed to disk before the next cell starts: a killed run loses one cell at most."""
    with open(path, "a+b") as f:                      # appends wherever the reading position is
        end = f.seek(0, os.SEEK_END)
        torn = end > 0 and f.seek(end - 1) >= 0 and f.read(1) != b"\n"   # a killed run's cut line
        f.write(b"\n" * torn + json.dumps(row, ensure_ascii=False).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def make_folder(out: Path, inversions: bool = False):
    """The sweep's folder (with its parents) and its cells/ (and inversions/, for photo cases),
    made once every cell has been checked, so a refused spec leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: the results go in a folder")
    try:
        for sub in ("cells", "inversions")[:1 + inversions]:
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".p2p-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot make the sweep folder {out}: {e.strerror or e}") from None


@contextlib.contextmanager
def hold(out: Path, shard: tuple[int, int]):
    """This shard's lock on the folder while it runs, so a second process given the same shard, or
    sharding the folder another way, stops with one line instead of running the same cells again.
    It is a flock on DIR/results.lock (results.K-of-N.lock): the kernel drops it when its process
    ends, however it ends, so a killed run blocks no one; the file says who holds it, and its
    holder removes it when done (one left by a killed run is taken over by the next)."""
    k, n = shard
    for other in out.glob("results*.lock"):
        if other.name != f"{results_file(out, shard).stem}.lock" and lock_count(other.name) != n:
            with contextlib.suppress(FileNotFoundError), open(other) as f:   # (gone: its run has ended)
                if not try_lock(f):
                    raise InputError(f"--out {out}: another process runs it in {lock_count(other.name)} shards "
                                     f"({holder(f)}, {other.name}), which would run this shard's cells too: give "
                                     f"--shard K/{lock_count(other.name)}, or wait for it")
    path = results_file(out, shard).with_suffix(".lock")
    while True:
        f = open(path, "a+")
        if not try_lock(f):
            who = holder(f)
            f.close()
            raise InputError(f"--out {out}: shard {k}/{n} is already running ({who}, {path.name} is locked): "
                             "wait for it, or give another --shard K/N")
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()                # its last holder removed it between our open and our lock: take the new one
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


def try_lock(f) -> bool:
    """False where another process holds it; True, with a note, on a file system without flock."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:         # e.g. Lustre mounted without -o flock: run, but say what is not guarded
        print(f"note: cannot lock {f.name} ({e.strerror or e}): nothing stops a second run of this shard",
              file=sys.stderr)
    return True


def holder(f) -> str:
    f.seek(0)
    return f.read().strip() or "another process"


def lock_count(name: str) -> int:
    """N of a lock file's name: results.K-of-N.lock, or 1 for results.lock (and any other name)."""
    match = re.fullmatch(r"results\.\d+-of-(\d+)\.lock", name)
    return int(match[1]) if match else 1


# ---- running the cells ----------------------------------------------------------------------

def run_cells(every: list[Cell], job: Job, what: str, run_cell: Callable[[StableDiffusion, Cell, object], dict],
              load_nets: Callable[[], object], inversions: bool = False):
    """Run this shard's unfinished cells in job.out, appending each one's results row as it finishes:
    the folder made (with inversions/), the shard's lock held, the model and the metrics' networks
    loaded only if a cell is left (`load_nets()`: the metrics' networks). `what` begins the line that
    says how many; `run_cell(sd, cell, nets)` runs one and returns its row."""
    make_folder(job.out, inversions)
    k, n = job.shard
    with hold(job.out, job.shard):
        done = read_results(job.out)
        mine = [c for c in every if c.index % n == k]
        todo = [c for c in mine if c.key not in done]
        print(f"{what}, {len(mine)} in shard {k}/{n}, {len(todo)} to run", file=sys.stderr)
        if not todo:
            return
        sd, nets, path = job.load_model(), load_nets(), results_file(job.out, job.shard)
        for cell in tqdm(todo, desc="cells", file=sys.stderr):
            append(path, run_cell(sd, cell, nets))
        print(f"wrote {path} (+{len(todo)} cells) and their images in {job.out / 'cells'}", file=sys.stderr)


# ---- the tables -----------------------------------------------------------------------------

def figure(values: list[float], scale: float = 1.0, spread: bool = True) -> str:
    """The mean of `values` (nan left out) times `scale`: with their standard deviation, "mean ± sd"
    to 4 and 2 significant digits (a sweep's summary), or alone to 2 decimals (`spread` False:
    PIE-Bench's tables); "-" where none is a number, "inf" where all are infinite, else how many are."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if any(math.isinf(v) for v in values):
        return "inf" if all(math.isinf(v) for v in values) else f"inf ({sum(map(math.isinf, values))} of {len(values)})"
    if not spread:
        return f"{statistics.fmean(values) * scale:.2f}"
    sd = statistics.stdev(values) * abs(scale) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values) * scale:.4g} ± {sd:.2g}"


def write_text(path: Path, text: str):
    """Whole or not at all, under a name of this process's own (shards may report at once)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)
