"""Per-scan work as tasks on Dask distributed: a ``LocalCluster`` or an existing cluster.

``prepare``, ``twin`` and ``predict`` hand every scan to :func:`run_tasks` as one task.
A task must be idempotent and atomic (it writes its files atomically and marks itself
done last), so running it twice, or again after a killed worker, gives the same files.

Schedulers (``--scheduler`` of the commands):

* ``local`` / ``local:N``: a :class:`distributed.LocalCluster` of N worker processes
  with one thread each (default N: the CPU count), started and stopped here;
* ``tcp://host:8786`` (any Dask address): an existing cluster, e.g. started with
  ``dask scheduler`` + ``dask worker tcp://host:8786 --nthreads 1`` on each machine,
  or by dask-jobqueue / dask-kubernetes. Workers must see the same paths (shared file
  system) and have lidc-det installed;
* ``serial``: in this process, one task after the other (no Dask; for debugging and as
  the reference that distributed runs are compared against).

Failures: a task that raises is retried once (``retries=1``), so a scan that fails twice
is reported with its error while the other scans go on. A worker that dies (killed,
out of memory) is replaced by its nanny and its tasks are rescheduled by Dask; a task
that kills ``distributed.scheduler.allowed-failures`` (3) workers is reported as failed.

GPU tasks carry the worker resource ``GPU=1`` (``resources={"GPU": 1}``): they run only
on workers started with ``--resources GPU=1`` (a local cluster gives each worker that
resource when CUDA is visible), one at a time per worker.

Each task's wall time, worker and peak resident memory (RSS of the worker process while
the task ran, sampled every 50 ms) are recorded in :class:`TaskOutcome`.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lidc_det.errors import LidcDetError

__all__ = ["RunReport", "SchedulerError", "TaskOutcome", "connect", "parse_scheduler", "run_tasks"]


class SchedulerError(LidcDetError):
    """A ``--scheduler`` value that is neither ``serial``, ``local[:N]`` nor a Dask address."""


@dataclass(frozen=True)
class TaskOutcome:
    """One task's result.

    Attributes:
        key: the task's name (e.g. the SeriesInstanceUID).
        ok: True when the task returned.
        value: what it returned (None on failure).
        error: ``"<ExceptionType>: <message> (at file:line)"`` on failure, else None.
        seconds: wall time of the (last) attempt on its worker, s (0 when unknown).
        peak_rss_mb: largest RSS of the worker process while the task ran, MiB (0 when unknown).
        worker: address of the worker that ran it (``"serial"`` in-process).
    """

    key: str
    ok: bool
    value: Any
    error: str | None
    seconds: float
    peak_rss_mb: float
    worker: str


@dataclass(frozen=True)
class RunReport:
    """All tasks of one :func:`run_tasks` call, in input order.

    Attributes:
        outcomes: one :class:`TaskOutcome` per item.
        scheduler: the scheduler used (as given, or ``local:N`` with N filled in).
        n_workers: workers of the cluster when the run started (1 for serial).
        seconds: wall time of the whole run (cluster start included), s.
    """

    outcomes: tuple[TaskOutcome, ...]
    scheduler: str
    n_workers: int
    seconds: float

    @property
    def failed(self) -> dict[str, str]:
        return {o.key: str(o.error) for o in self.outcomes if not o.ok}

    @property
    def values(self) -> dict[str, Any]:
        return {o.key: o.value for o in self.outcomes if o.ok}

    def summary(self) -> str:
        ok = [o for o in self.outcomes if o.ok]
        peak = max((o.peak_rss_mb for o in ok), default=0.0)
        lines = [f"{len(ok)} of {len(self.outcomes)} tasks done on {self.scheduler} ({self.n_workers} workers) "
                 f"in {self.seconds:.1f} s; peak task RSS {peak:.0f} MiB"]
        lines += [f"FAILED {k}: {e}" for k, e in self.failed.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler, "n_workers": self.n_workers, "seconds": round(self.seconds, 2),
            "tasks": [{"key": o.key, "ok": o.ok, "error": o.error, "seconds": round(o.seconds, 3),
                       "peak_rss_mb": round(o.peak_rss_mb, 1), "worker": o.worker} for o in self.outcomes],
        }


def parse_scheduler(spec: str | None) -> tuple[str, int | None]:
    """``("serial", None)``, ``("local", N or None)`` or ``("address", None)`` for a scheduler string.

    Raises:
        SchedulerError: anything else (names the value).
    """
    s = (spec or "local").strip()
    if s == "serial":
        return "serial", None
    if s == "local":
        return "local", None
    if s.startswith("local:"):
        n = s.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise SchedulerError(f"--scheduler {s!r}: local:N needs a worker count N >= 1")
        return "local", int(n)
    if "://" in s:
        return "address", None
    raise SchedulerError(f"--scheduler {s!r}: expected serial, local, local:N or a Dask address (tcp://host:8786)")


def _cuda_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


@contextmanager
def connect(scheduler: str | None = "local", *, gpu: bool | None = None) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``scheduler`` (``local[:N]`` or an address); a local
    cluster is closed on exit. ``gpu`` (default: CUDA visible) gives local workers ``GPU=1``."""
    import logging

    from distributed import Client, LocalCluster

    kind, n = parse_scheduler(scheduler)
    if kind == "serial":
        raise SchedulerError("connect() needs a cluster; 'serial' runs without one")
    if kind == "address":
        client = Client(str(scheduler), timeout="30s")
        try:
            yield client
        finally:
            client.close()
        return
    n_workers = n or os.cpu_count() or 1
    use_gpu = _cuda_visible() if gpu is None else gpu
    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.ERROR, resources={"GPU": 1} if use_gpu else None,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measured(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float, str]:
    """Run ``fn(*args)`` and return ``(value, seconds, peak RSS MiB, worker address)``; the
    RSS of this process is sampled every 50 ms while it runs (a worker runs one task at a time)."""
    peak = [_rss_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        value = fn(*args)
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], _rss_mb())
    try:
        from distributed import get_worker

        where = get_worker().address
    except (ImportError, ValueError):
        where = "serial"
    return value, time.perf_counter() - t0, peak[0], where


def _error_line(err: BaseException) -> str:
    tb = traceback.extract_tb(err.__traceback__)
    where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
    return f"{type(err).__name__}: {err}{where}"


def run_tasks(
    fn: Callable[..., Any],
    items: Sequence[tuple[str, tuple[Any, ...]]],
    *,
    scheduler: str | None = "local",
    client: Any = None,
    retries: int = 1,
    resources: dict[str, float] | None = None,
    desc: str = "tasks",
    progress: bool = True,
) -> RunReport:
    """Run ``fn(*args)`` for each ``(key, args)`` of ``items`` as one task and collect the outcomes.

    Args:
        fn: an importable module-level function (workers unpickle it by name).
        items: ``(key, args)`` pairs; keys must be unique (they name the tasks).
        scheduler: ``serial``, ``local[:N]`` or a Dask address (ignored with ``client``).
        client: an open :class:`distributed.Client` to use instead of starting one.
        retries: extra attempts for a task that raises (lost workers are rescheduled by Dask
            regardless).
        resources: worker resources each task needs, e.g. ``{"GPU": 1}``.
        desc: progress-bar label.

    Returns:
        A :class:`RunReport` in input order; failures are collected, never raised.
    """
    from tqdm import tqdm

    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("run_tasks: task keys must be unique")
    t0 = time.perf_counter()
    outcomes: dict[str, TaskOutcome] = {}
    bar = tqdm(total=len(items), desc=desc, unit="scan", disable=not progress or not items)
    kind = "client" if client is not None else parse_scheduler(scheduler)[0]
    if kind == "serial":
        for key, args in items:
            outcomes[key] = _serial(fn, key, args, retries)
            bar.update(1)
        bar.close()
        return RunReport(tuple(outcomes[k] for k in keys), "serial", 1, time.perf_counter() - t0)
    if client is None:
        with connect(scheduler, gpu=None if not resources else bool(resources.get("GPU"))) as c:
            report = _on_cluster(c, fn, items, retries, resources, bar, str(scheduler or "local"))
    else:
        report = _on_cluster(client, fn, items, retries, resources, bar, "client")
    bar.close()
    return RunReport(report.outcomes, report.scheduler, report.n_workers, time.perf_counter() - t0)


def _serial(fn: Callable[..., Any], key: str, args: tuple[Any, ...], retries: int) -> TaskOutcome:
    err: BaseException | None = None
    for _ in range(retries + 1):
        try:
            value, secs, peak, where = measured(fn, *args)
            return TaskOutcome(key, True, value, None, secs, peak, where)
        except Exception as e:  # noqa: BLE001 - collected per task
            err = e
    assert err is not None
    return TaskOutcome(key, False, None, _error_line(err), 0.0, 0.0, "serial")


def _on_cluster(
    client: Any, fn: Callable[..., Any], items: Sequence[tuple[str, tuple[Any, ...]]], retries: int,
    resources: dict[str, float] | None, bar: Any, label: str,
) -> RunReport:
    from distributed import as_completed

    n_workers = len(client.nthreads())
    futures = {}
    for key, args in items:
        fut = client.submit(measured, fn, *args, key=f"{getattr(fn, '__name__', 'task')}-{key}", pure=False,
                            retries=retries, resources=resources)
        futures[fut] = key
    outcomes: dict[str, TaskOutcome] = {}
    for fut in as_completed(list(futures)):
        key = futures[fut]
        try:
            value, secs, peak, where = fut.result()
            outcomes[key] = TaskOutcome(key, True, value, None, secs, peak, where)
        except Exception as err:  # noqa: BLE001 - the task's own error (after retries), or KilledWorker
            outcomes[key] = TaskOutcome(key, False, None, _error_line(err), 0.0, 0.0, "")
        fut.release()
        bar.update(1)
    return RunReport(tuple(outcomes[k] for k, _ in items), label, n_workers, 0.0)
