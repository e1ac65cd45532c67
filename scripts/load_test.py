"""Load test: N tune.py workers on one study of tiny trials, some killed, one interrupted; prints what held.

    python scripts/load_test.py --workers 32                       # a journal file, then PostgreSQL
    python scripts/load_test.py --workers 4 --storage journal --n-trials 12 --kill 1

Each storage gets a fresh study (PostgreSQL: a throwaway server on loopback, whose password must never be printed). The
workers start at once, training 784-16/32-10 nets for 2 epochs on the first --images training and 500 test images (one
thread each, tune.py's heartbeat); once trials have reported an epoch, --kill workers get SIGKILL, --interrupt SIGINT.

It prints each check (docs/scaling.md, "The load test", lists them) with what was seen, then the figures: peak memory
(per worker, all together), the storage's share of the workers' main-thread time, the server's peak connections,
trials per minute (--baseline: against one worker alone). Exit status 1 if a check failed.
"""

import argparse
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import sqlalchemy.exc  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

import mlp.study  # noqa: E402
from mlp.data import FILES, load_split, locate_fashion_mnist  # noqa: E402
from mlp.errors import UserError, check, run_script  # noqa: E402
from mlp.postgres import Unavailable, throwaway_postgres  # noqa: E402
from mlp.records import TrialRecord  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PASSWORD = "load-test-secret"
WORKER_MB = 550  # 8 workers peaked at 4,142 MB of proportional memory together (torch's import alone: 420 each)
SPARE_MB = 1000  # the workers are stopped if the machine's available memory falls below this: others share it
# What a worker's output holds when a storage call failed: Optuna's and SQLAlchemy's errors, the drivers'.
STORAGE_ERRORS = ("Traceback", "StorageInternalError", "OperationalError", "database is locked", "too many clients",
                  "already finished", "Heartbeat of trial", "UpdateFinishedTrialError", "InterfaceError",
                  "to acquire the lock file", "Forcibly releasing")

# Run in each worker before tune.py: one thread, short heartbeats, and the main thread's time inside the
# storage's calls (the outermost call only), written with the process's peak memory when it exits.
WORKER_PATCH = """
import atexit, json, resource, sqlalchemy, threading, time, torch
torch.set_num_threads(1)
import mlp.study
mlp.study.HEARTBEAT_SECONDS, mlp.study.GRACE_SECONDS = {heartbeat}, {grace}
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
clock = {{"storage": 0.0, "calls": 0, "depth": 0, "connections": 0, "start": time.perf_counter()}}
def timed(method):
    def call(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread() or clock["depth"]:
            return method(*args, **kwargs)
        clock["depth"] += 1
        began = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            clock["storage"] += time.perf_counter() - began
            clock["calls"] += 1
            clock["depth"] -= 1
    return call
for cls in (RDBStorage, JournalStorage):
    for name in [n for n in dir(BaseStorage) if not n.startswith("__")] + ["_get_stale_trial_ids"]:
        if callable(getattr(cls, name, None)):
            setattr(cls, name, timed(getattr(cls, name)))
def opened(connection, record):
    clock["connections"] += 1
sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", opened)
def save():
    with open({times!r}, "w") as out:
        json.dump({{"storage_s": clock["storage"], "storage_calls": clock["calls"],
                   "connections_opened": clock["connections"], "wall_s": time.perf_counter() - clock["start"],
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}, out)
atexit.register(save)
"""


def write_idx(path: Path, data: Any) -> None:
    """A uint8 tensor as a gzipped IDX file (big-endian header: magic 0x0000 08 ndim, then each dim)."""
    header = struct.pack(">I", 0x0800 + data.dim()) + b"".join(struct.pack(">I", n) for n in data.shape)
    path.write_bytes(gzip.compress(header + data.contiguous().numpy().tobytes()))


def data_slice(folder: Path, images: int) -> Path:
    """The first `images` training and 500 test images, as a data_dir of their own: each worker holds a copy."""
    files = locate_fashion_mnist("data")
    folder.mkdir(parents=True)
    for split, n in (("train", images), ("test", 500)):
        pixels, labels = load_split(files, split, folder / "cache")
        write_idx(folder / f"{FILES[f'{split}_images']}.gz", pixels[:n])
        write_idx(folder / f"{FILES[f'{split}_labels']}.gz", labels[:n].to(dtype=pixels.dtype))
    return folder


def start_worker(flags: list[str], out: Path, times: Path, heartbeat: float, grace: float) -> subprocess.Popen:
    patch = WORKER_PATCH.format(heartbeat=heartbeat, grace=grace, times=str(times))
    script = str(ROOT / "scripts" / "tune.py")
    code = ("import runpy, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"sys.argv = {[script, *flags]!r}\n{patch}\nrunpy.run_path({script!r}, run_name='__main__')")
    with out.open("w") as log:  # a file, not a pipe: a full pipe would block the worker
        return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


class Reader:
    """The study as the workers left it, read through one storage of this process's own."""

    def __init__(self, storage: str, study: str) -> None:
        self.storage_url, self.study, self.storage = storage, study, None

    def trials(self) -> list[FrozenTrial]:
        try:
            if self.storage is None:
                if "://" in self.storage_url:
                    # Named on PostgreSQL, so as not to count itself among the workers' connections. No pool: a
                    # storage that fails as it opens (no tables yet) leaves its connection to the collector.
                    postgres = "postgresql" in self.storage_url
                    named = {"connect_args": {"application_name": "load_test"}} if postgres else {}
                    self.storage = optuna.storages.RDBStorage(self.storage_url, skip_table_creation=True,
                                                              engine_kwargs={**named, "poolclass": NullPool})
                elif Path(self.storage_url).exists():
                    backend = optuna.storages.journal.JournalFileBackend(self.storage_url)
                    self.storage = optuna.storages.JournalStorage(backend)
                else:
                    return []
            return optuna.load_study(study_name=self.study, storage=self.storage).get_trials(deepcopy=False)
        except (KeyError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
            return []  # the tables or the study are not created yet

    def connections(self) -> int | None:
        if not isinstance(self.storage, optuna.storages.RDBStorage) or self.storage.engine.name != "postgresql":
            return None
        with self.storage.engine.connect() as c:
            return c.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'tune' "
                                     "AND application_name <> 'load_test'").scalar()


def memory_mb(pid: int) -> tuple[float, float]:
    """Resident and proportional memory (shared pages split among their sharers: the workers share torch's code)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            sizes = {n.rstrip(":"): int(size) for n, size, *_ in map(str.split, rollup) if n in ("Rss:", "Pss:")}
        return sizes["Rss"] / 1024, sizes["Pss"] / 1024
    except (OSError, KeyError):
        return 0.0, 0.0  # the process ended meanwhile


def available_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")) / 1024


def ended_before(trials: list[FrozenTrial], number: int, when: float) -> bool:
    """Whether trial `number` ended before `when` (the trials' times are this machine's clock)."""
    trial = next((t for t in trials if t.number == number), None)
    return trial is not None and trial.datetime_complete is not None and trial.datetime_complete.timestamp() < when


def run_workers(storage: str, study: str, workers: int, n_trials: int, kill: int, interrupt: int, data: Path,
                folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start the workers, kill and interrupt some, wait for the rest; what happened, for `checks`."""
    folder.mkdir(parents=True)
    logs, reader, epochs = folder / "logs", Reader(storage, study), str(args.epochs)
    flags = [f"--storage={storage}", f"--study-name={study}", f"--n-trials={n_trials}", "--pruner=none", "--fuse=1",
             "--epochs", epochs, epochs, "--depth", "1", "1", "--width", "16", "32", "--final=best",
             f"--data.data_dir={data}", "--data.val_size=200", "--data.batch_size=64",
             f"--trainer.logger.init_args.save_dir={logs}"]
    launched = time.time()
    processes = [start_worker(flags, folder / f"worker{i}.log", folder / f"worker{i}.json", args.heartbeat, args.grace)
                 for i in range(workers)]
    try:
        killed: dict[int, float] = {}  # trial number: when its worker was killed
        missed: list[float] = []  # when a worker was killed whose trial had just ended
        signalled: set[int] = set()  # the indexes of the workers killed or interrupted
        interrupted: list[int] = []  # the interrupted workers' indexes
        peak_rss, peak_pss, peak_connections, trials = 0.0, 0.0, 0, []
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in processes):
            if time.monotonic() > deadline:
                raise UserError(f"the workers did not finish within {args.timeout:g} s; their logs are in {folder}")
            check(available_mb() > SPARE_MB, f"the machine's available memory fell below {SPARE_MB} MB; the workers "
                  "were stopped: run fewer (--workers)")
            sizes = [memory_mb(p.pid) for p in processes if p.poll() is None]
            peak_rss, peak_pss = max(peak_rss, sum(r for r, _ in sizes)), max(peak_pss, sum(p for _, p in sizes))
            if (connections := reader.connections()) is not None:
                peak_connections = max(peak_connections, connections)
            trials = reader.trials()
            # A trial read as running may have ended before the kill landed (the read is up to a poll old): that
            # kill hit no trial, so another worker's is killed instead.
            missed += [killed.pop(n) for n, when in list(killed.items()) if ended_before(trials, n, when)]
            if len(killed) < kill or len(interrupted) < interrupt:
                # Only a trial that trained an epoch has surely beaten; one near its end may end before the kill lands
                # (the read takes a while), and two workers have no other to kill instead, so with epochs to spare it
                # is not taken. A worker holds one trial (--fuse 1). A killed trial's retry is spared: signalled in
                # turn, it is not retried again, and its original would seem never rerun.
                running = [t for t in trials if t.state == TrialState.RUNNING and "failed_trial" not in t.system_attrs
                           and 1 <= TrialRecord.of(t).epochs_trained <= max(1, args.epochs - 3)]
                by_pid = {int(t.user_attrs["worker"].rsplit(":", 1)[1]): t for t in running
                          if t.user_attrs.get("worker")}
                for index, process in enumerate(processes):
                    trial = by_pid.get(process.pid)
                    untouched = sum(p.poll() is None for i, p in enumerate(processes) if i not in signalled)
                    if trial is None or index in signalled or untouched < 2:
                        continue  # the last worker untouched is left to finish the study
                    if len(killed) < kill and trial.number not in killed:
                        process.send_signal(signal.SIGKILL)
                        killed[trial.number] = time.time()
                        signalled.add(index)
                    elif len(interrupted) < interrupt:
                        process.send_signal(signal.SIGINT)
                        interrupted.append(index)
                        signalled.add(index)
            time.sleep(0.5)
    finally:  # on an error here, or Ctrl-C, no worker is left behind
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    trials = reader.trials()
    missed += [killed.pop(n) for n, when in list(killed.items()) if ended_before(trials, n, when)]
    outputs = [(folder / f"worker{i}.log").read_text() for i in range(workers)]
    said = outputs[0].strip().splitlines()[-1:] or ["nothing"]  # a worker's error is its last line
    check(any(t.state in FINISHED for t in trials), f"no trial finished; worker 0's output ends: {said[0]}")
    times = [json.loads(f.read_text()) for f in sorted(folder.glob("worker*.json"))]
    return dict(storage=storage, launched=launched, trials=trials, killed=killed, interrupted=interrupted,
                processes=processes, outputs=outputs, times=times, peak_rss=peak_rss, peak_pss=peak_pss,
                grace=args.grace, study=study, kill=kill, interrupt=interrupt, logs=logs, n_trials=n_trials,
                missed=missed, peak_connections=peak_connections if "postgresql" in storage else None)


def checks(run: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(check, held, what was seen) for each check."""
    trials: list[FrozenTrial] = run["trials"]
    by_number = {t.number: t for t in trials}
    finished = [t for t in trials if t.state in FINISHED]
    signalled = (len(run["killed"]), len(run["interrupted"]))
    result = [
        ("finished trials == --n-trials", len(finished) == run["n_trials"], f"{len(finished)} of {run['n_trials']}"),
        ("trial numbers unique", len(by_number) == len(trials), f"{len(trials)} trials, {len(by_number)} numbers"),
        ("nothing left running or queued", not [t for t in trials if not t.state.is_finished()],
         ", ".join(f"{s.name}: {n}" for s in TrialState if (n := sum(t.state == s for t in trials)))),
        ("killed and interrupted as asked, mid-trial", signalled == (run["kill"], run["interrupt"]),
         f"{signalled[0]} killed, {signalled[1]} interrupted; {len(run['missed'])} more killed just after their "
         "trial ended"),
    ]
    delays, replaced = [], []
    for number, when in run["killed"].items():
        trial = by_number[number]
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == number]
        if trial.state == TrialState.FAIL and trial.datetime_complete:
            delays.append(trial.datetime_complete.timestamp() - when)
        replaced.append(len(retries) == 1 and retries[0].state in FINISHED and retries[0].params == trial.params)
    if run["killed"]:
        result.append((
            "every killed trial failed by heartbeat and rerun once",
            len(delays) == len(run["killed"]) and all(replaced),
            f"{len(run['killed'])} killed; failed {', '.join(f'{d:.1f}' for d in delays)} s after the kill "
            f"(stale {run['grace']:g} s after its last beat, seen at a worker's next pass); rerun: {sum(replaced)}"))
    for index in run["interrupted"]:
        output, code = run["outputs"][index], run["processes"][index].returncode
        result.append(("the interrupted worker failed its trial and said so", code == 1 and "interrupted:" in output
                       and "Traceback" not in output, f"worker {index}: exit status {code}"))
    errors = [(i, e) for i, o in enumerate(run["outputs"]) for e in STORAGE_ERRORS if e in o]
    result.append(("no storage error in any worker's output", not errors,
                   "; ".join(f"worker {i}: {e}" for i, e in errors[:5]) or "none"))
    missing = [t.number for t in trials if t.state == TrialState.COMPLETE
               and not Path(t.user_attrs.get("best_checkpoint", "")).is_file()]
    result.append(("every complete trial's checkpoint present", not missing, f"missing: {missing or 'none'}"))
    if "postgresql" in run["storage"]:
        # A pool of 2 opens a few connections in a worker's life (replacing one the server dropped, opening the study
        # again for the report); a connection per call would open hundreds. At once, no more than the pools hold.
        opened = max((t["connections_opened"] for t in run["times"]), default=0)
        calls = min((t["storage_calls"] for t in run["times"]), default=0)
        pooled = opened <= 6 and run["peak_connections"] <= 2 * len(run["processes"])
        result.append(("one connection pool a worker: at most 6 connections opened by each, 2 a worker at once",
                       pooled, f"at most {opened} by one worker (the fewest storage calls of a worker: {calls}); "
                       f"the server's peak: {run['peak_connections']} at once"))
    reporters = sum('"best_trial"' in o for o in run["outputs"])
    report = run["logs"] / "tune" / run["study"] / "report.json"
    result.append(("one report", reporters == 1 and report.is_file(),
                   f"{reporters} printed, report.json: {report.is_file()}"))
    if "postgresql" in run["storage"]:
        leaked = [str(f) for f in run["logs"].rglob("*") if f.is_file() and PASSWORD.encode() in f.read_bytes()]
        leaked += [f"worker {i}'s output" for i, o in enumerate(run["outputs"]) if PASSWORD in o]
        result.append(("no password in any output or file", not leaked, ", ".join(leaked[:5]) or "none found"))
    return result


def figures(run: dict[str, Any]) -> dict[str, Any]:
    finished = [t for t in run["trials"] if t.state in FINISHED]
    last = max((t.datetime_complete.timestamp() for t in finished), default=run["launched"])
    first = min((t.datetime_start.timestamp() for t in run["trials"] if t.datetime_start), default=run["launched"])
    storage_s, wall_s, calls = (sum(t[key] for t in run["times"]) for key in ("storage_s", "wall_s", "storage_calls"))
    peaks = [round(t["peak_rss_mb"]) for t in run["times"]]
    return {"workers": len(run["processes"]), "finished": len(finished), "seconds": round(last - run["launched"], 1),
            "trials_per_minute": round(len(finished) / (last - run["launched"]) * 60, 1),
            # From the first trial's start: the workers' start-up (importing torch, 32 times on 2 cores) left out.
            "trials_per_minute_after_start_up": round(len(finished) / (last - first) * 60, 1),
            "storage_share": round(storage_s / wall_s, 4) if wall_s else None,
            "storage_calls_per_trial": round(calls / max(1, len(finished)), 1),
            "peak_memory_mb_all_workers": {"resident": round(run["peak_rss"]), "proportional": round(run["peak_pss"])},
            "peak_rss_mb_per_worker": {"min": min(peaks, default=None), "max": max(peaks, default=None),
                                       "of_exited_workers": len(peaks)},
            "peak_connections": run["peak_connections"]}


def one_storage(kind: str, args: argparse.Namespace, data: Path, folder: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        storage = (stack.enter_context(throwaway_postgres(PASSWORD)) if kind == "postgresql"
                   else str(folder / "study.journal") if kind == "journal" else f"sqlite:///{folder / 'study.db'}")
        run = run_workers(storage, "load", args.workers, args.n_trials, args.kill, args.interrupt, data, folder / "n",
                          args)
        result = {"storage": kind, "checks": checks(run), **figures(run)}
        if args.baseline:
            # A study of its own, on the same storage (server, or a file beside the first).
            alone = run_workers(storage.replace("study.", "alone."), "alone", 1, args.baseline, 0, 0, data,
                                folder / "1", args)
            result["one_worker_trials_per_minute"] = figures(alone)["trials_per_minute"]
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--n-trials", type=int, help="finished trials the study needs (default 2 per worker)")
    parser.add_argument("--kill", type=int, default=3, help="workers SIGKILLed mid-trial (default 3)")
    parser.add_argument("--interrupt", type=int, default=1, help="workers sent SIGINT mid-trial (default 1)")
    parser.add_argument("--storage", nargs="+", choices=["journal", "postgresql", "sqlite"],
                        default=["journal", "postgresql"])
    parser.add_argument("--images", type=int, default=2000, help="training images in the slice (default 2000)")
    parser.add_argument("--epochs", type=int, default=2, help="each trial's epochs (default 2)")
    parser.add_argument("--baseline", type=int, default=0, metavar="TRIALS",
                        help="also time one worker alone on a study of this many trials (default: not)")
    parser.add_argument("--heartbeat", type=float, default=mlp.study.HEARTBEAT_SECONDS,
                        help=f"seconds between heartbeats (default {mlp.study.HEARTBEAT_SECONDS}, as tune.py's)")
    parser.add_argument("--grace", type=float, default=mlp.study.GRACE_SECONDS,
                        help=f"seconds without a heartbeat before a trial is stale (default {mlp.study.GRACE_SECONDS})")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the workers may take (default 1800)")
    parser.add_argument("--keep", help="a folder to keep the workers' logs and studies in (default: removed)")
    args = parser.parse_args(argv)
    args.n_trials = 2 * args.workers if args.n_trials is None else args.n_trials
    check(args.workers >= 1 and args.n_trials >= 1, "--workers and --n-trials must be >= 1")
    check(min(args.kill, args.interrupt) >= 0, "--kill and --interrupt count workers: 0 or more")
    check(args.kill + args.interrupt < args.workers, "--kill + --interrupt must leave at least one worker")
    check(args.images > 200, "--images must be above the 200 validation images")
    check(args.epochs >= 1 and args.baseline >= 0, "--epochs must be >= 1, --baseline >= 0")
    check(min(args.heartbeat, args.grace, args.timeout) > 0, "--heartbeat, --grace and --timeout are seconds above 0")
    available = available_mb()
    check(args.workers * WORKER_MB < available, f"{args.workers} workers need about {args.workers * WORKER_MB} MB "
          f"({WORKER_MB} MB each) and {available:.0f} MB are free: run fewer (--workers)")
    with ExitStack() as stack:
        # Resolved: the workers run in the repository's folder, where a relative path is another one.
        root = Path(args.keep).resolve() if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        check(not root.exists() or root.is_dir() and not any(root.iterdir()),
              f"--keep {root}: choose an empty or new folder")
        data = data_slice(root / "data", args.images)
        results = []
        for kind in args.storage:
            try:
                results.append(one_storage(kind, args, data, root / kind))
            except Unavailable as why:
                results.append({"storage": kind, "skipped": str(why)})
    for result in results:
        print(f"\n{result['storage']}: " + ("skipped, " + result["skipped"] if "skipped" in result else ""))
        for what, held, seen in result.get("checks", []):
            print(f"  {'ok  ' if held else 'FAIL'} {what}: {seen}")
        print(json.dumps({k: v for k, v in result.items() if k not in ("storage", "checks")}))
    return results


def failed(results: list[dict[str, Any]]) -> list[str]:
    return [f"{r['storage']}: {what}: {seen}" for r in results for what, held, seen in r.get("checks", []) if not held]


if __name__ == "__main__":
    run_script(lambda: sys.exit(1 if failed(main()) else 0), interrupted="the load test stopped, and its workers",
               writes_with="--keep")
