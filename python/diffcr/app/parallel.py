"""How training spreads over processes: one strategy object per run, chosen once.

Every runner gets a :class:`Strategy` and never asks the environment itself: which process
it is (``rank``, ``world``, ``device``, ``is_main``), how the model is wrapped
(:meth:`~Strategy.prepare`), how rows are gathered across processes, and whether every
process holds every parameter (then the runner checks that they agree,
:meth:`~Strategy.identical`).

* :class:`Torchrun` -- the class-conditional runner (``diffcr train --model DIT``): one
  process, or DDP under ``torchrun`` through ``torch.distributed`` itself; the runner writes
  its own resumable state (safetensors + JSON, no pickle) from the main process.
* :class:`Accelerated` -- captioned fine-tuning: one process, or DDP under ``torchrun`` /
  ``accelerate launch --multi_gpu``: accelerate wraps the model, its ``save_state`` /
  ``load_state`` hold the resumable state (``OUT/step-N/accelerate``).
* :class:`FSDP2` (captioned, ``--fsdp``) -- ``torch.distributed.fsdp.fully_shard`` on every
  transformer block (its router, ratio parameters and LoRA layers with it) and on the model;
  accelerate then only runs the loop. The resumable state goes through
  ``torch.distributed.checkpoint`` (every process writes its shards of the weights and the
  optimizer to ``OUT/step-N/fsdp/``, and its data generator beside them); the checkpoints a
  user loads are written from the whole weights, gathered onto the main process's CPU.

The captioned runner calls, in order: :meth:`~Accelerated.shard` (before the optimizer is
made), :meth:`~Strategy.prepare`, then :meth:`~Accelerated.load_state` /
:meth:`~Accelerated.save_state` and :meth:`~Accelerated.whole_model` for every save.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List

import torch

from .core import identical_across_ranks
from .options import TrainConfig, TrainError

__all__ = ["Strategy", "Torchrun", "Accelerated", "FSDP2", "strategy_for"]


class Strategy:
    """One way to run a training loop over processes (see the module docstring)."""

    #: what the resumable state folders of this strategy hold (``loop_state.json``'s ``state``)
    state_kind = ""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def name(self) -> str:
        """The ``parallel`` entry of ``metrics.json``."""
        return "ddp" if self.world > 1 else "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model, opt, loop=None):
        """``(net, opt)``: the module the loop calls and the optimizer it steps."""
        raise NotImplementedError

    def gather(self, row: torch.Tensor) -> torch.Tensor:
        """Every process's ``row`` (``[1, n]``), concatenated in rank order (a collective)."""
        raise NotImplementedError

    def replicated(self) -> bool:
        """Whether every process holds every parameter (then the runner checks that they
        agree)."""
        return self.world > 1

    def identical(self, params: List[torch.Tensor]) -> bool:
        """Whether ``params`` hold the same values on every process (a collective)."""
        return identical_across_ranks(params, self.gather)


class Torchrun(Strategy):
    """The class-conditional runner's processes: one, or several under ``torchrun`` (its
    ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``), DDP through ``torch.distributed`` (NCCL on
    GPUs, gloo on CPUs). :meth:`close` ends the process group."""

    state_kind = "torchrun"

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
            if torch.cuda.is_available() else torch.device("cpu")
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def prepare(self, model, opt, loop=None):
        if self.world == 1:
            return model, opt
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), opt

    def gather(self, row):
        if self.world == 1:
            return row
        import torch.distributed as dist

        rows = [torch.zeros_like(row) for _ in range(self.world)]
        dist.all_gather(rows, row)
        return torch.cat(rows)

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every process's picklable ``obj``, in rank order (a collective)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        got = [None] * self.world
        dist.all_gather_object(got, obj)
        return got

    def close(self) -> None:
        """Wait for every process, then end the process group (with several)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


class _AcceleratedBase(Strategy):
    """A strategy over accelerate's processes (``acc``: the run's ``Accelerator``)."""

    def __init__(self, acc):
        self.acc = acc
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device

    def shard(self, model) -> None:
        """Before the optimizer is made (sharding replaces the parameters)."""

    def gather(self, row):
        return self.acc.gather(row)

    def save_state(self, folder: Path, model, opt, loop) -> None:
        """The resumable state (weights, optimizer, RNGs, ``loop``), every process its part."""
        raise NotImplementedError

    def load_state(self, folder: Path, model, opt, loop) -> None:
        """The state :meth:`save_state` wrote into ``model``, ``opt`` and ``loop``."""
        raise NotImplementedError

    def whole_model(self, model, build: Callable[[], torch.nn.Module]):
        """The model with its whole weights on the main process (None on the others), for
        the user-facing checkpoints; a collective: every process calls it."""
        return model if self.acc.is_main_process else None


class Accelerated(_AcceleratedBase):
    """One process, or DDP: accelerate wraps the model."""

    state_kind = "accelerate"

    def prepare(self, model, opt, loop=None):
        net, opt = self.acc.prepare(model, opt)
        self.acc.register_for_checkpointing(loop)
        return net, opt

    def save_state(self, folder, model, opt, loop):
        self.acc.save_state(str(folder / "accelerate"))

    def load_state(self, folder, model, opt, loop):
        self.acc.load_state(str(folder / "accelerate"))


class FSDP2(_AcceleratedBase):
    """``fully_shard`` on every transformer block and the model (``--fsdp``)."""

    state_kind = "fsdp"
    name = "fsdp"

    def __init__(self, acc):
        super().__init__(acc)
        if acc.num_processes < 2:
            raise TrainError("--fsdp shards the model across processes: launch with torchrun "
                             "--nproc_per_node N or accelerate launch --multi_gpu "
                             "--num_processes N (N >= 2)")
        self._opt = None  # the optimizer before accelerate wraps it (its state dict is sharded)

    def shard(self, model):
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            raise TrainError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch "
                             f">= 2.6); this torch is {torch.__version__}") from e
        from diffcr.models import family_for

        for _, block in family_for(model).blocks(model):
            fully_shard(block)
        fully_shard(model)

    def prepare(self, model, opt, loop=None):
        self._opt = opt  # sharded already: accelerate must not wrap the model in DDP
        return model, self.acc.prepare(opt)

    def save_state(self, folder, model, opt, loop):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, self._opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / "fsdp"))
        torch.save(loop.state_dict(), folder / "fsdp" / f"loop-rank{self.acc.process_index}.pt")

    def load_state(self, folder, model, opt, loop):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        mine = folder / "fsdp" / f"loop-rank{self.acc.process_index}.pt"
        if not mine.is_file():
            raise TrainError(f"--resume {folder}: no state of process {self.acc.process_index} "
                             f"({mine.name}); resume with as many processes as saved it")
        msd, osd = get_state_dict(model, self._opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(folder / "fsdp"))
        set_state_dict(model, self._opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        loop.load_state_dict(torch.load(mine, weights_only=True))

    def whole_model(self, model, build):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if not self.acc.is_main_process:
            return None
        with torch.random.fork_rng(devices=[]):  # the run's RNG streams stay as they are
            plain = build()
        plain.load_state_dict(whole)
        return plain

    def replicated(self):
        return False  # each parameter has one copy


def strategy_for(cfg: TrainConfig) -> type:
    """The strategy class of a captioned run (instantiate it with the run's ``Accelerator``;
    the class-conditional runner, which has no ``--fsdp``, always runs :class:`Torchrun`):
    :class:`FSDP2` with ``--fsdp``, else :class:`Accelerated`. Refuses accelerate's own FSDP
    plugin, which would not shard the model (called before accelerate is set up)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise TrainError("accelerate's FSDP plugin (--use_fsdp, or an FSDP accelerate config) "
                         "does not shard diffcr train's model: launch with --multi_gpu and "
                         "pass --fsdp to diffcr train, which applies FSDP2 to every "
                         "transformer block itself")
    return FSDP2 if cfg.fsdp else Accelerated

