"""Holding up at scale: main-process-only side effects, atomic checkpoints, graceful stop on SIGINT/SIGTERM.

- `is_main_process()` (dpokit.core.processes): rank 0 of the whole job; only it writes the run folder.
- `AtomicCheckpointMixin`: Trainer writes `checkpoint-N` straight into its output folder, so a kill during a save
  leaves a half-written checkpoint that `get_last_checkpoint` would pick. The mixin makes Trainer write into
  `checkpoints/.staging/checkpoint-N` and renames the folder into place once every rank has finished.
- `StopOnSignal`: the first SIGINT/SIGTERM asks Trainer to save a checkpoint and stop at the end of the current
  step (agreed across ranks, so no rank waits in a collective for one that left); a second one stops at once.
- `destroy_process_group_at_exit()`: after a finished run, the launcher's process group is destroyed when the
  process exits, while Python is still alive.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import rotate_checkpoints

from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text, chmod_tree_as_created
from dpokit.core.processes import is_main_process
from dpokit.train.checkpoints import STAGING


def quiet_non_main_process() -> None:
    """Other ranks print nothing but errors: one job, one set of messages."""
    if is_main_process():
        return
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()


def destroy_process_group_at_exit() -> None:
    """Call when training finished on every rank: this process's process group (torchrun / accelerate launch) is
    destroyed at exit (atexit, Python still alive) instead of during interpreter shutdown. Nothing without one.

    Workaround: Trainer never destroys the process group it creates (accelerate only in `end_training()`), and torch
    leaves an undestroyed gloo group to interpreter shutdown, where its worker threads may not be joined yet
    (std::terminate) or may still hold a finished collective's tensors (freeing them needs the GIL of a dying
    interpreter): a rank can die with SIGABRT after a successful run, depending on thread timing (PyTorch's own
    tests hit this, pytorch/pytorch#65231; the likely cause of tests/test_distributed.py's one SIGABRT). torch's docs
    ask programs to call destroy_process_group(); we do it only after success, because destroying while another rank
    is still inside a collective blocks. Remove when torch or Trainer destroys the group at exit itself."""
    global _destroy_registered
    if _destroy_registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    atexit.register(_destroy_process_group)
    _destroy_registered = True


_destroy_registered = False


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def clean_staging(ckpt_dir: str | os.PathLike) -> None:
    """Remove saves that a kill interrupted (main process only)."""
    if is_main_process():
        shutil.rmtree(Path(ckpt_dir) / STAGING, ignore_errors=True)


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint (they are logged again) and a line cut by a kill."""
    if not is_main_process() or not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


# Workaround: transformers.Trainer reports train_loss as the mean over the steps of *this* session
# (`_finalize_training`: `_total_loss_scalar / (global_step - _initial_global_step)`), so a resumed run's
# train_summary.json averaged only the resumed part. Each checkpoint records the sum of per-step losses so far, and
# `whole_run_train_loss` restores the whole-run mean. Reads Trainer's private `_total_loss_scalar`, `_tr_loss` and
# `_initial_global_step` (transformers 5.x; tests/test_resume.py fails if they change). Remove if Trainer ever
# carries its loss total across a resume.
LOSS_SUM_FILE = "dpokit_loss_sum.json"
# TR-DPO (train.sync_reference): the synced reference's parameters, so a resume continues from them.
SYNCED_REFERENCE_FILE = "dpokit_synced_reference.pt"


def loss_sum_so_far(trainer) -> float:
    """Sum of per-step training losses from step 0 to now (logged part + the part not yet logged)."""
    pending = getattr(trainer, "_tr_loss", None)
    pending = nested_gather(pending, trainer.args.parallel_mode).mean().item() if pending is not None else 0.0
    return getattr(trainer, "_loss_sum_before_resume", 0.0) + trainer._total_loss_scalar + pending


def restore_synced_reference(trainer, checkpoint: str) -> None:
    """TR-DPO: load the reference as it was synced at `checkpoint` (saved by AtomicCheckpointMixin)."""
    synced = getattr(trainer, "synced_reference", None)
    if synced is None:
        return
    path = Path(checkpoint, SYNCED_REFERENCE_FILE)
    if not path.is_file():
        raise UserError(f"--resume: {checkpoint} holds no synced reference ({SYNCED_REFERENCE_FILE}), but "
                        "train.sync_reference is set; resume with the config the run started with, or start fresh")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, param in synced.named_parameters():
            param.copy_(saved[name])


def restore_loss_sum(trainer, checkpoint: str) -> None:
    """Read the loss sum of the steps before `checkpoint` (see LOSS_SUM_FILE); older checkpoints lack it."""
    try:
        saved = json.loads(Path(checkpoint, LOSS_SUM_FILE).read_text(encoding="utf-8"))
        trainer._loss_sum_before_resume = float(saved["loss_sum"])
    except (OSError, ValueError, KeyError, TypeError):
        trainer._loss_sum_before_resume = None


def whole_run_train_loss(trainer, session_mean: float | None) -> float | None:
    """The mean training loss over every step of the run, resumed or not (None when it cannot be known)."""
    before = getattr(trainer, "_loss_sum_before_resume", 0.0)
    first = getattr(trainer, "_initial_global_step", 0)
    steps = trainer.state.global_step
    if session_mean is None or first == 0 or steps == 0:
        return session_mean  # not resumed: Trainer's mean is already the whole run's
    if before is None:
        return None  # resumed from a checkpoint without the loss sum: the whole-run mean is unknown
    return (before + session_mean * (steps - first)) / steps


class AtomicCheckpointMixin:
    """Mix in before `transformers.Trainer`: checkpoints appear only complete (write to staging, then rename).

    Workaround: transformers.Trainer writes `checkpoint-N` in place (`Trainer._save_checkpoint`), so a kill mid-save
    leaves a half-written folder that `resume_from_checkpoint` then loads. We override the private methods
    `_get_output_dir` and `_save_checkpoint` (transformers 5.x) to redirect the save into a staging folder and rename
    it when every rank is done. Remove when Trainer saves checkpoints atomically itself; re-check both private
    methods on every transformers upgrade (tests/test_crash_recovery.py fails if their behaviour changes).
    """

    _staging_root: str | None = None

    def _get_output_dir(self, trial):
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        final_root = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(final_root, STAGING)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
            os.makedirs(staging_root, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        loss_sum = loss_sum_so_far(self)  # a collective in multi-process runs: every rank calls it
        if self.args.should_save:
            atomic_write_text(os.path.join(staging_root, name, LOSS_SUM_FILE),
                              json.dumps({"global_step": self.state.global_step, "loss_sum": loss_sum}))
            synced = getattr(self, "synced_reference", None)
            if synced is not None:
                torch.save({n: p.detach().cpu() for n, p in synced.named_parameters()},
                           os.path.join(staging_root, name, SYNCED_REFERENCE_FILE))
        # Every rank writes parts (RNG state, sharded optimizer); rename only when all are done.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = os.path.join(final_root, name)
            if os.path.isdir(target):  # this step was saved already: keep that one, it is complete
                shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
            else:
                chmod_tree_as_created(os.path.join(staging_root, name))
                os.replace(os.path.join(staging_root, name), target)
            try:
                os.rmdir(staging_root)  # leave no empty staging folder behind
            except OSError:
                pass
            rotate_checkpoints(output_dir=final_root, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


class TrainingStopped(UserError):
    """Training stopped on a signal after saving a checkpoint; exit code 128 + signal number, as shells expect."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal(TrainerCallback):
    """First SIGINT/SIGTERM: save a checkpoint and stop after the current optimizer step. Second: stop now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.received is not None:  # asked twice: give up on the clean stop
            self.uninstall()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = signum

    def _any_rank_received(self, args) -> bool:
        flag = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.received is None:
                self.received = signal.SIGTERM  # another rank got it (launchers forward SIGTERM)
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True
        return control
