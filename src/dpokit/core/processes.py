"""This process's place in a job: rank, world size, whether it is the main process, and the process group.

Launchers (torchrun, accelerate launch, deepspeed) export RANK and WORLD_SIZE; a plain run has neither and is rank
0 of 1. The one place that reads them, so every stage agrees on who writes the run folder and who prints.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)  # unset or empty: a plain run


def is_main_process() -> bool:
    """Rank 0 of the whole job: only it writes the run folder and prints the summaries."""
    return rank() == 0


def no_accelerator() -> bool:
    """True on a CPU-only machine. Trainer then needs use_cpu=True, or under torchrun it sets up no gloo group and
    every rank silently trains alone on all the data."""
    import torch

    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        return not acc.is_available()
    return not torch.cuda.is_available()


def join_process_group() -> tuple[int, int]:
    """(rank, world size), setting up the process group the Trainer would set up when a launcher started us."""
    if world_size() <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=no_accelerator())  # the same state TrainingArguments builds later (a singleton)
    return state.process_index, state.num_processes


def leave_launched_rank(code: int | str | None) -> None:
    """End a launched rank (torchrun / accelerate launch) without interpreter shutdown: run the atexit handlers
    (dpokit's process-group destroy, logging's flush, trackers), flush, then `os._exit(code)`. Plain runs return.

    Workaround: during `Py_FinalizeEx` a gloo worker thread can still be destroying a finished collective
    (`ProcessGroupGloo::AsyncWork`, seen with an all-gather) whose tensors belong to Python; freeing them takes the
    GIL, which in a finalizing interpreter ends the thread with `pthread_exit`, whose unwind through the noexcept
    destructor calls std::terminate ("terminate called without an active exception", SIGABRT after a successful
    run; the core dump's stacks in docs/distributed.md). Destroying the group at atexit is not enough: the C++ group
    lives on while DDP's reducer or accelerate hold it. PyTorch tried an atexit destroy too (pytorch/pytorch#179291,
    abandoned). Remove when torch joins gloo's workers, or drops their Python references, before finalization."""
    if "LOCAL_RANK" not in os.environ and world_size() <= 1:  # torchrun exports both, even for one process
        return
    import atexit
    import sys

    if isinstance(code, str):  # sys.exit("message"): Python would print it and exit 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to lose
            pass
    os._exit(code or 0)

