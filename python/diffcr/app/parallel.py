"""How captioned fine-tuning spreads over processes: one strategy object, chosen once.

* :class:`Accelerated` -- one process, or DDP under ``torchrun`` / ``accelerate launch
  --multi_gpu``: accelerate wraps the model, its ``save_state`` / ``load_state`` hold the
  resumable state (``OUT/step-N/accelerate``).
* :class:`FSDP2` (``--fsdp``) -- ``torch.distributed.fsdp.fully_shard`` on every transformer
  block (its router, ratio parameters and LoRA layers with it) and on the model; accelerate
  then only runs the loop. The resumable state goes through ``torch.distributed.checkpoint``
  (every process writes its shards of the weights and the optimizer to ``OUT/step-N/fsdp/``,
  and its data generator beside them); the checkpoints a user loads are written from the whole
  weights, gathered onto the main process's CPU.

The runner calls, in order: :meth:`~Strategy.shard` (before the optimizer is made),
:meth:`~Strategy.prepare`, then :meth:`~Strategy.load_state` / :meth:`~Strategy.save_state`
and :meth:`~Strategy.whole_model` for every save.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .options import TrainConfig, TrainError

__all__ = ["Strategy", "Accelerated", "FSDP2", "strategy_for"]


class Strategy:
    """One way to run the loop over ``acc``'s processes (see the module docstring)."""

    #: what the resumable state folders of this strategy hold (``loop_state.json``'s ``state``)
    state_kind = ""
    #: the ``parallel`` entry of ``metrics.json``
    name = ""

    def __init__(self, acc):
        self.acc = acc

    def shard(self, model) -> None:
        """Before the optimizer is made (sharding replaces the parameters)."""

    def prepare(self, model, opt, loop):
        """``(net, opt)``: the module the loop calls and the optimizer it steps."""
        raise NotImplementedError

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

    def replicated(self) -> bool:
        """Whether every process holds every parameter (then the runner checks that they
        agree)."""
        return self.acc.num_processes > 1


class Accelerated(Strategy):
    """One process, or DDP: accelerate wraps the model."""

    state_kind = "accelerate"

    @property
    def name(self):
        return "ddp" if self.acc.num_processes > 1 else "none"

    def prepare(self, model, opt, loop):
        net, opt = self.acc.prepare(model, opt)
        self.acc.register_for_checkpointing(loop)
        return net, opt

    def save_state(self, folder, model, opt, loop):
        self.acc.save_state(str(folder / "accelerate"))

    def load_state(self, folder, model, opt, loop):
        self.acc.load_state(str(folder / "accelerate"))


class FSDP2(Strategy):
    """``fully_shard`` on every transformer block and the model (``--fsdp``)."""

    state_kind = name = "fsdp"

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

    def prepare(self, model, opt, loop):
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
    """The strategy class of a run (instantiate it with the run's ``Accelerator``):
    :class:`FSDP2` with ``--fsdp``, else :class:`Accelerated`. Refuses accelerate's own FSDP
    plugin, which would not shard the model (called before accelerate is set up)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise TrainError("accelerate's FSDP plugin (--use_fsdp, or an FSDP accelerate config) "
                         "does not shard diffcr train's model: launch with --multi_gpu and "
                         "pass --fsdp to diffcr train, which applies FSDP2 to every "
                         "transformer block itself")
    return FSDP2 if cfg.fsdp else Accelerated

