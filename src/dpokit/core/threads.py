"""CPU threads: how many PyTorch uses, and whether other processes are competing for the same cores.

PyTorch's intra-op pool assumes it owns every core. When another process keeps some of them busy, a pool that
still uses all of them waits on its slowest thread at every parallel region; with OpenMP threads that spin-wait
(libgomp's default, which dpokit/__init__.py turns to PASSIVE) it is worst: 3.9x beside a PyTorch matmul loop on
the 2-core machine, against 2.1x passive and 1.5x with one thread (docs/cpu-threads.md has the table).
`cpu_load_of_others` samples the CPU times (psutil) before training starts so the CLI can say so in one line.
"""

from __future__ import annotations

import os
import time

import psutil


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds over all CPUs since boot (psutil; /proc/stat on Linux)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)  # user, nice, system, idle, iowait, irq, softirq, steal, guest... (guest is inside user)
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return total - idle, total


def cpu_load_of_others(seconds: float = 0.3) -> float | None:
    """CPUs' worth of work other processes did during a short sleep of this one (e.g. 1.0 = one core busy)."""
    start = _cpu_times()
    mine = time.process_time()
    time.sleep(seconds)
    end = _cpu_times()
    if end[1] == start[1]:
        return None
    total_cpus = os.cpu_count() or 1
    busy_share = (end[0] - start[0]) / (end[1] - start[1])  # of all CPUs
    others = busy_share * total_cpus - (time.process_time() - mine) / seconds
    return max(others, 0.0)


def apply_num_threads(num_threads: int | None) -> int:
    """Set PyTorch's intra-op threads when configured; return the count in use."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def oversubscription_warning(threads: int, others: float | None, cpus: int | None = None) -> str | None:
    """One line when this process's threads plus the others' load exceed the cores, else None."""
    cpus = cpus or usable_cpus()
    if others is None or others < 0.5 or threads + others <= cpus + 0.25:
        return None
    free = max(int(cpus - others + 0.5), 1)
    if threads <= free:  # already as few as can help
        return None
    return (f"warning: other processes keep about {others:.1f} of {cpus} CPUs busy and training uses {threads} "
            f"threads; it may run much slower. Set train.num_threads={free} (or OMP_NUM_THREADS={free}), or wait "
            "for the CPUs to be free (docs/cpu-threads.md)")
