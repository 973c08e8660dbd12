"""Worker of ``tests/app/test_fsdp2.py`` (run under torchrun, gloo, CPU): a tiny converted PixArt
sharded with FSDP2 (``fully_shard`` per block and at the root) takes two training steps with
``ratio_loss`` and ``project_ratios``; prints the routers and ratios it ends with."""
import json
import os
import sys

import torch
import torch.distributed as dist

# tests/, where tiny_models lives
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard

    import diffcr
    from tiny_models import make, set_ratios

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = make("pixart")
    diffcr.convert(m, diffcr.DiffCRConfig(num_regions=2))
    set_ratios(m, [0.55, 0.75])
    for b in m.transformer_blocks:
        fully_shard(b)
    fully_shard(m)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    diffcr.attach_ratio_projection(opt, m)
    g = torch.Generator().manual_seed(dist.get_rank())  # each rank its own data
    for _ in range(2):
        x = torch.randn(2, 4, 8, 8, generator=g)
        text = torch.randn(2, 5, 32, generator=g)
        y = m(x, encoder_hidden_states=text, timestep=torch.tensor([100, 900])).sample
        loss = y.square().mean() + diffcr.ratio_loss(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, table = diffcr.ratio_table(m)
    routers = [b.router.weight.full_tensor().tolist() for b in diffcr.routed_blocks(m).values()]
    # one file per rank: two processes printing to one pipe can land on one line
    out = os.path.join(os.environ["DIFFCR_RESULT_DIR"], f"rank{dist.get_rank()}.json")
    with open(out, "w") as f:
        json.dump({"rank": dist.get_rank(), "ratios": table.tolist(), "routers": routers}, f)
    # both ranks done before the group goes: tearing gloo down while the other rank still
    # talks to it aborted a rank now and then ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
