"""The distributed strategy a launched run asks for, the one it actually gets, and FSDP2 on CPU-only machines.

`accelerate launch --config_file configs/accelerate/X.yaml` hands the strategy to every process in environment
variables (`ACCELERATE_USE_FSDP` and `FSDP_*`, `ACCELERATE_USE_DEEPSPEED`); the Trainer's Accelerator reads them.
Where the strategy cannot run, accelerate falls back to plain data parallel without a word. dpokit does not:

- `launcher_problems()` (plan time, before any weights load): a launcher config that would fall back stops the run
  with exit 2 and the reason. A user asks for FSDP or ZeRO because the model does not fit one device as a full
  copy; a run that silently holds full copies fails later (out of memory, hours in) or wastes the machines.
- `CpuFsdpMixin`: FSDP2 on a CPU-only machine (gloo), where torch supports it and accelerate does not turn it on.
- `check_strategy()` (after the Trainer is built, before the first step): the strategy in use is the one asked for.
- `distributed_summary()`: what train_summary.json records (`distributed`).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from dpokit.core.errors import UserError
from dpokit.core.processes import no_accelerator, world_size


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_strategy() -> str:
    """What the launcher asked for: deepspeed, fsdp, ddp (several processes) or none."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if world_size() > 1 else "none"


def fsdp2_available() -> bool:
    """torch's FSDP2 (`fully_shard`), which runs on CPU tensors with a gloo process group (torch >= 2.6)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


def launcher_problems(engine: str) -> list[str]:
    """Launcher configs that would silently fall back to plain data parallel here, each with the fix."""
    wanted = requested_strategy()
    config = "the accelerate launch config"  # the launcher does not export which file it read
    problems = []
    if wanted == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            problems.append(f"{config} asks for DeepSpeed, which is not installed; `pip install deepspeed`, or launch "
                            "with configs/accelerate/fsdp.yaml (FSDP2 shards without it)")
        elif no_accelerator():
            # accelerate (AcceleratorState) runs DeepSpeed only when not on CPU; Trainer sets cpu on this machine.
            problems.append(f"{config} asks for DeepSpeed ZeRO, which accelerate runs only on GPUs; on this CPU-only "
                            "machine it would fall back to plain data parallel (a full copy per process); launch with "
                            "configs/accelerate/fsdp.yaml (FSDP2 shards on CPU) or ddp.yaml")
    if wanted == "fsdp" and no_accelerator():
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            problems.append(f"{config} asks for FSDP version {version}; on a CPU-only machine dpokit runs only FSDP2; "
                            "set fsdp_config.fsdp_version: 2 (as configs/accelerate/fsdp.yaml does)")
        elif not fsdp2_available():
            problems.append(f"{config} asks for FSDP2, which this torch ({torch.__version__}) cannot run on CPU "
                            "(needs torch >= 2.6 with gloo); upgrade torch or launch with configs/accelerate/ddp.yaml")
        if engine == "trl":
            problems.append("train.engine: trl does not shard on a CPU-only machine (FSDP on CPU is dpokit's own "
                            "trainer); use train.engine: native, or launch with configs/accelerate/ddp.yaml")
    return problems


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Turn FSDP2 on for an Accelerator that the launcher asked for FSDP but that runs on CPU processes.

    Workaround: accelerate 1.15 (`AcceleratorState.__init__`) turns `ACCELERATE_USE_FSDP` into
    `DistributedType.FSDP` only for GPU-like process groups (MULTI_GPU, MULTI_XPU, ...); on MULTI_CPU (gloo) it
    drops the FSDP plugin and the Trainer silently trains plain data parallel. torch's FSDP2 (`fully_shard`) runs
    on CPU with gloo, and accelerate's FSDP2 path (`fsdp2_prepare_model`, full state-dict save and load) has no
    CUDA-only step, so we set the state accelerate would have set. Remove when accelerate enables FSDP for
    MULTI_CPU itself (tests/test_fsdp.py then still passes with this function returning False)."""
    state = accelerator.state
    if not (_flag("ACCELERATE_USE_FSDP") and state.distributed_type == DistributedType.MULTI_CPU
            and getattr(state, "fsdp_plugin", None) is None and fsdp2_available()):
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerator builds it
    if plugin.fsdp_version != 2:
        return False  # the plan refuses this config before training (launcher_problems)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ ends
    return True


class CpuFsdpMixin:
    """Mix in before `transformers.Trainer`: FSDP2 runs on CPU-only machines too (see `enable_fsdp_on_cpu`).

    Overrides `create_accelerator_and_postprocess` (transformers 5.x, public), the one place the Trainer builds its
    Accelerator and reads `is_fsdp_enabled` from it, before it decides where the model goes."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True


def actual_strategy(trainer) -> str:
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "deepspeed"
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp"
    return "ddp" if trainer.args.world_size > 1 else "none"


def check_strategy(trainer) -> None:
    """Before the first step: the Trainer uses the strategy the launcher asked for, or the run stops (exit 2)."""
    wanted, got = requested_strategy(), actual_strategy(trainer)
    if wanted != got:
        raise UserError(f"the launcher asked for {wanted}, but this run would train with {got} "
                        f"({trainer.accelerator.state.distributed_type}); launch with a config this machine runs: "
                        "configs/accelerate/ddp.yaml, or fsdp.yaml")


def _numel(param) -> tuple[int, int]:
    """(elements this rank holds, elements of the full parameter)."""
    if hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3: a placeholder tensor, the rank's partition in ds_tensor
        return param.ds_tensor.numel(), param.ds_numel
    local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2 parameters are DTensors
    return local.numel(), param.numel()


def distributed_summary(trainer, model) -> dict:
    """The strategy used, for train_summary.json: type, processes, machines, whether training state was sharded,
    and the parameters each rank held (a collective: every rank calls it)."""
    kind = actual_strategy(trainer)
    processes = trainer.args.world_size
    machines = max(1, processes // int(os.environ.get("LOCAL_WORLD_SIZE") or processes))  # torchrun sets it
    counts = [_numel(p) for p in model.parameters()]
    local, full = sum(c[0] for c in counts), sum(c[1] for c in counts)
    per_rank = [local]
    if processes > 1 and torch.distributed.is_initialized():
        per_rank = [None] * processes
        torch.distributed.all_gather_object(per_rank, local)
    info = {"type": kind, "processes": processes, "machines": machines,
            "sharded": kind == "fsdp" and processes > 1 or kind == "deepspeed",
            "parameters": {"full": full, "per_rank": per_rank}}
    if kind == "deepspeed":
        info["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage
        info["sharded"] = processes > 1 and info["zero_stage"] > 0
    return info
