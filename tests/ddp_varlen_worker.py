"""Launched by tests/test_gpu_engine.py under `python -m torch.distributed.run --nproc_per_node 2` (not collected by
pytest): each rank wraps the policy in DDP (gloo), computes the DPO loss of its half of the pairs with the varlen
layout (the CPU emulation of the kernel) through the wrapper, and backpropagates; rank 0 saves the loss averaged
over ranks and the all-reduced gradients.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_varlen_worker.py MODELS PAIRS PAD OUT
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from dpokit.core.config import TrainConfig
from dpokit.core.packing import pack_pairs, packed_sequence_logps
from dpokit.train.losses import PairLogps, sigmoid_loss


def main(models: Path, pairs_file: Path, pad_id: int, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    policy = AutoModelForCausalLM.from_pretrained(models / "policy", dtype=torch.float32).train()
    ref = AutoModelForCausalLM.from_pretrained(models / "ref", dtype=torch.float32).eval()
    pairs = json.loads(pairs_file.read_text())
    mine = pairs[rank * len(pairs) // world:(rank + 1) * len(pairs) // world]  # equal halves: DDP's mean = global
    ddp = DistributedDataParallel(policy)
    batch = pack_pairs(mine, pad_id, attention="varlen")
    logps = packed_sequence_logps(ddp, batch)
    with torch.no_grad():
        reference = packed_sequence_logps(ref, batch)
    lp = PairLogps(logps["chosen"], logps["rejected"], reference["chosen"], reference["rejected"])
    loss = sigmoid_loss(lp, TrainConfig(beta=0.5)).mean()
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world, "grads": {n: p.grad for n, p in policy.named_parameters()}}, out)
    # Workaround: a gloo group torn down while the other rank is still working, or left to interpreter shutdown
    # with DDP's reducer alive, can end a finished rank with SIGABRT ("terminate called without an active
    # exception", pytorch/pytorch#65231; seen once in CI on this worker). Both ranks meet at a barrier, the wrapper
    # goes before the group, and the process leaves without running interpreter-shutdown destructors. Remove when
    # torch joins gloo's threads on destroy.
    dist.barrier()
    del ddp
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
