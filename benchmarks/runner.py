"""Crash-safe task execution for the benchmark and accuracy sweeps.

A supervisor (this process; it never imports torch) runs the tasks of a job in a worker subprocess
(`python3 -m benchmarks.runner JOB.json`). The worker appends one JSON row per finished task to a JSONL file
(flushed and fsynced), and names the task it is on in a marker file. One failing point records its error and
the sweep goes on; when a failure leaves the CUDA context unusable (an illegal address, a device assert) the
worker exits with code 3 and the supervisor starts a fresh worker that skips the finished tasks; a worker that
crashes or outlives the job's deadline is killed, and its current task gets an error row. Tasks never reached
get a 'skipped' row, so every task of a job has exactly one row.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback

POISONED = 3  # worker exit code: the CUDA context is unusable, restart


class Skip(Exception):
    """Raised by an executor: the point is not run, for the stated reason."""


def load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def read_rows(path: str) -> list:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
    return rows


def append_row(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()


class Context:
    """What an executor sees besides its task: the job's config, every row so far (also those of earlier
    workers), and a cache for inputs and references that lives as long as this worker."""

    def __init__(self, config: dict, rows: list):
        self.config = config
        self.rows = rows
        self.cache = {}

    def find(self, **match):
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]


def cuda_poisoned() -> bool:
    """True when the CUDA context no longer runs work (a sticky error); False without CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return False
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        return False
    except Exception:
        return True


def _after_error():
    try:
        import gc

        import torch
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def describe_error(e: BaseException) -> dict:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    kind = type(e).__name__
    if "out of memory" in str(e).lower():
        kind = "OutOfMemory"
    return dict(status="error", reason=f"{kind}: {first[:300]}",
                traceback="".join(traceback.format_exception(e)[-6:])[-2000:])


def worker(job_path: str) -> int:
    # Executors raise benchmarks.runner.Skip; when this file runs as __main__ its own Skip is another class.
    skip = importlib.import_module("benchmarks.runner").Skip
    with open(job_path) as f:
        job = json.load(f)
    execute = load(job["executor"])
    rows = read_rows(job["rows"])
    done = {r["key"] for r in rows}
    ctx = Context(job["config"], rows)
    total = len(job["tasks"])
    for i, task in enumerate(job["tasks"]):
        if task["key"] in done:
            continue
        if time.time() > job["deadline"]:
            print(f"[{job['name']}] time budget reached; {total - i} tasks left unrun", flush=True)
            return 0
        _write(job["current"], task["key"])
        t0 = time.time()
        poisoned = False
        try:
            row = execute(task, ctx)
        except skip as s:
            row = dict(status="skipped", reason=str(s))
        except Exception as e:  # one failing point records its error; the sweep goes on
            row = describe_error(e)
            poisoned = cuda_poisoned()
            if poisoned:
                row["reason"] += " (CUDA context lost: worker restarted)"
            else:
                _after_error()
        row = {**task, **row, "wall_s": round(time.time() - t0, 3)}
        append_row(job["rows"], row)
        ctx.rows.append(row)
        done.add(task["key"])
        _write(job["current"], "")
        print(f"[{job['name']} {i + 1}/{total}] {row.get('summary') or task['key']}: {row['status']}"
              + (f" ({row['reason']})" if row.get("reason") else ""), flush=True)
        if poisoned:
            return POISONED
    return 0


KILLED_SLOW = "killed: this point ran past the per-point limit"
KILLED_BUDGET = "killed: the time budget ran out during this point"


def _wait(proc, current_path, deadline, grace_s, task_limit_s):
    """Wait for the worker; kill it at the deadline (+ grace) or when one task runs past task_limit_s.
    Returns (exit code or None, why it was killed or None)."""
    key, since = None, time.time()
    while True:
        try:
            return proc.wait(timeout=0.5), None
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        try:
            with open(current_path) as f:
                cur = f.read().strip()
        except OSError:
            cur = None
        if cur != key:
            key, since = cur, now
        why = None
        if now > deadline + grace_s:
            why = KILLED_BUDGET
        elif key and task_limit_s and now - since > task_limit_s:
            why = f"{KILLED_SLOW} ({task_limit_s:.0f} s)"
        if why:
            proc.kill()
            proc.wait()
            return None, why


def run_job(name: str, executor: str, tasks: list, config: dict, work_dir: str, deadline: float,
            max_restarts: int = 10, grace_s: float = 10.0, env: dict | None = None,
            task_limit_s: float | None = None) -> list:
    """Run `tasks` (dicts with a unique 'key') through `executor` ('module:function', called as
    execute(task, ctx) -> row dict) in worker subprocesses until done or `deadline` (a time.time() value).
    A task running longer than task_limit_s is killed (error row; executors may skip its kin) and a new worker
    goes on. Returns one row per task, in task order."""
    os.makedirs(work_dir, exist_ok=True)
    rows_path = os.path.join(work_dir, f"{name}.jsonl")
    current_path = os.path.join(work_dir, f"{name}.current")
    job_path = os.path.join(work_dir, f"{name}.job.json")
    with open(job_path, "w") as f:
        json.dump(dict(name=name, executor=executor, tasks=tasks, config=config, deadline=deadline,
                       rows=rows_path, current=current_path), f, default=str)
    keys = {t["key"] for t in tasks}
    restarts = 0
    while True:
        done = {r["key"] for r in read_rows(rows_path)}
        if not (keys - done) or time.time() >= deadline:
            break
        _write(current_path, "")
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.runner", job_path],
                                env=dict(os.environ, **(env or {})))
        rc, killed = _wait(proc, current_path, deadline, grace_s, task_limit_s)
        with open(current_path) as f:
            current = f.read().strip()
        done = {r["key"] for r in read_rows(rows_path)}
        if current and current not in done:
            task = next(t for t in tasks if t["key"] == current)
            reason = killed or f"worker process died with exit code {rc} during this point"
            append_row(rows_path, {**task, "status": "error", "reason": reason})
            print(f"[{name}] {current}: error ({reason})", flush=True)
        if rc == 0 or killed == KILLED_BUDGET:
            break
        restarts += 1
        if restarts > max_restarts:
            print(f"[{name}] giving up after {max_restarts} worker restarts", flush=True)
            break
        why = killed or f"exited with code {rc}"
        print(f"[{name}] worker {why}; restarting ({restarts}/{max_restarts})", flush=True)
    by_key = {}
    for r in read_rows(rows_path):
        by_key.setdefault(r["key"], r)
    return [by_key.get(t["key"]) or {**t, "status": "skipped",
                                     "reason": "not run: the time budget ran out before this point"}
            for t in tasks]


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
