"""What every benchmark script shares: timing, quiet logging, Markdown tables and the results files.

- measure(): times several callables round-robin (a, b, c, a, b, c, ...) so that a change in the load
  of a shared machine hits all of them alike; wall clock and this process's CPU time per call, with the
  device synchronised around each call on CUDA.
- call_ms(): one timed call that also hands back the callable's result (whole val.run, detect.run, ...).
- add_common_args() / start(): the --threads and --results flags every script takes.
- report(): prints the Markdown table and, with --results NAME, writes benchmarks/results/NAME.csv and
  NAME.md stamped with the commit, the command line and the machine.
- commit(), command(), machine(): that stamp, also used by the scripts that write their own results
  files (distill_gain.py, upstream_peer.py), so that every results file names its run alike.
"""
import csv
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Times:
    """The timed calls of one callable, in ms: wall clock and CPU time of this process (all threads)."""
    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    first: float = float("nan")  # wall ms of the untimed first call (start-up, allocation, lazy init)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn, device=None):
    """(fn(), wall ms, CPU ms) of one call. The CPU time counts every thread of this process and none of
    the time the scheduler gives to other processes, so on a loaded machine it is the steadier figure."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def measure(fns: dict, repeats: int, warmup: int = 1, device=None) -> dict:
    """{name: Times} of each callable: `warmup` untimed calls each, then `repeats` rounds that call every
    callable once in turn."""
    times = {k: Times() for k in fns}
    for k, fn in fns.items():
        for i in range(warmup):
            _, ms, _ = call_ms(fn, device)
            if i == 0:
                times[k].first = ms
    for _ in range(repeats):
        for k, fn in fns.items():
            _, wall, cpu = call_ms(fn, device)
            times[k].wall.append(wall)
            times[k].cpu.append(cpu)
    return times


@contextmanager
def quiet_log():
    """Keep the project logger's INFO lines off the console (collected and yielded); warnings still print."""
    from utils.logging import LOGGER

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
            if record.levelno >= logging.WARNING:
                print(record.getMessage(), file=sys.stderr)

    handlers, level = LOGGER.handlers[:], LOGGER.level
    LOGGER.handlers[:] = [Keep()]
    LOGGER.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        LOGGER.handlers[:] = handlers
        LOGGER.setLevel(level)


def add_common_args(parser, threads=1):
    """--threads (torch intra-op threads, default `threads`; None: no such flag) and --results NAME."""
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--results", default=None, metavar="NAME",
                        help="also write benchmarks/results/NAME.csv and NAME.md (commit, command, machine)")
    return parser


def start(opt):
    """Apply the common flags before anything is timed."""
    if getattr(opt, "threads", 0):
        torch.set_num_threads(opt.threads)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (the platform's processor or machine name elsewhere)."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")),
                   cpu)
    return cpu


def machine(device=None, detail=None) -> str:
    """One line: CPU model, cores, load average, torch and its thread count, and the GPU if one is used.

    detail: said after the torch version instead of this process's thread count, for scripts whose measured
    work runs in child processes with threads of their own (e.g. "OMP threads 1 on both sides").
    """
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    gpu = ""
    if device is not None and torch.device(device).type == "cuda":
        gpu = f", {torch.cuda.get_device_name(device)}"
    threads = f", {detail}" if detail else f" with {torch.get_num_threads()} thread(s)"
    return f"{cpu_name()}, {os.cpu_count()} cores{load}{gpu}, torch {torch.__version__}{threads}"


def commit() -> str:
    """Short hash of HEAD, marked when tracked code (.py, .yaml) differs from it: the code that ran."""
    def git(*args):
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.yaml") else "")


def command(args=None, script=None) -> str:
    """The command line of this process as one would type it again, OMP_NUM_THREADS included when set.

    args: the arguments (default sys.argv[1:]); script: the file that ran (default sys.argv[0]), for a
    script's main(argv) called from other code. A script of this package is typed as a module
    (`python -m benchmarks.NAME`): run that way sys.argv[0] is its file, and only that way do its imports
    of the project resolve.
    """
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    path = Path(script or sys.argv[0]).resolve()
    path = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    how = f"-m benchmarks.{path.stem}" if path.parent == Path("benchmarks") and path.suffix == ".py" else str(path)
    args = sys.argv[1:] if args is None else [str(a) for a in args]
    return f"{env}python {how} {shlex.join(args)}".strip()


def markdown_table(header, rows) -> str:
    """A Markdown table; a column whose cells are all numbers (or empty) is right-aligned."""
    def numeric(x):
        return isinstance(x, (int, float)) or x in ("", None)

    align = ["---:" if all(numeric(r[i]) for r in rows) and rows else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 10 else f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}"
    return str(x)


def report(title, header, rows, notes=(), results=None, device=None) -> str:
    """Print `title`, the table and the notes (Markdown); with results=NAME also write
    benchmarks/results/NAME.csv (the raw cells, the stamp as '#' lines first) and NAME.md."""
    stamp = [f"command: `{command()}`", f"commit: {commit()}", f"machine: {machine(device)}"]
    table = markdown_table(header, rows)
    body = "\n\n".join([table, *notes])
    print(f"\n## {title}\n\n" + "\n".join(f"- {s}" for s in stamp) + f"\n\n{body}\n")
    if results:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / f"{results}.csv", "w", newline="") as f:
            f.writelines(f"# {s.replace('`', '')}\n" for s in stamp)
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([["" if x is None else x for x in r] for r in rows])
        md = f"# {title}\n\n" + "\n".join(f"- {s}" for s in stamp) + f"\n\n{body}\n"
        (RESULTS / f"{results}.md").write_text(md)
        print(f"results written to {RESULTS / results}.csv and .md")
    return table
