"""CPU threads under contention (issue 18): the load of other processes is measured, the one-line warning fires
when threads + that load exceed the cores, and train.num_threads reaches PyTorch."""

import subprocess
import sys

import pytest
import torch

from dpokit.core.threads import apply_num_threads, cpu_load_of_others, oversubscription_warning


def test_load_of_a_busy_process_is_seen():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        import time

        time.sleep(0.5)  # let it start spinning
        others = cpu_load_of_others(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert others is not None and others > 0.6, others  # one core spinning (plus whatever else runs here)


@pytest.mark.parametrize(("threads", "others", "cpus", "warns", "suggested"), [
    (2, 1.0, 2, True, 1),     # one core taken, two threads: the case that ran 60x slower
    (1, 1.0, 2, False, None),  # one thread beside one busy core fits
    (2, 0.1, 2, False, None),  # background noise is not contention
    (8, 3.0, 8, True, 5),
    (4, 6.0, 4, True, 1),     # overloaded: suggest at least one thread
    (1, 3.0, 2, False, None),  # one thread is already the floor: nothing to suggest
])
def test_warning_only_when_oversubscribed(threads, others, cpus, warns, suggested):
    line = oversubscription_warning(threads, others, cpus)
    assert (line is not None) == warns
    if warns:
        assert "\n" not in line and f"train.num_threads={suggested}" in line and f"{threads} threads" in line


def test_no_measurement_no_warning():
    assert oversubscription_warning(2, None, 2) is None


def test_num_threads_is_applied_and_none_keeps_the_default():
    before = torch.get_num_threads()
    try:
        assert apply_num_threads(None) == before
        assert apply_num_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
