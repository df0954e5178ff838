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
