"""The A/B of dit-pixart-b1-ac-one-region-vs-per-step.txt: python ab_step_definitions.py KIND B MODE ROUNDS,
MODE "oneregion" (the bench before fa19de3: every step in one autocast region, gradients
accumulated) or "perstep" (since fa19de3: gradients None, each forward in its own region).
Prints the per-round times and the median fraction of ideal, flop-only and with the casts fixed."""
import sys, torch, statistics
torch.set_num_threads(1)
from diffcr.app.bench import make_block_bench, BlockBench, time_pairs
from diffcr.convert import unfreeze, routed_blocks
kind = sys.argv[1]; B = int(sys.argv[2]); mode = sys.argv[3]; rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
N = 1024; kappa = 0.55
bb = make_block_bench(kind, N, B)
unfreeze(bb.model)
for b in routed_blocks(bb.model).values():
    with torch.no_grad(): b.ratio.kept.fill_(kappa)
bb.model.train(); bb.dense.train()
for p in list(bb.block.parameters()) + list(bb.dense.parameters()): p.requires_grad_(True)
x = bb.inputs["hidden_states"].clone().requires_grad_()
inputs = dict(bb.inputs, hidden_states=x)
def step(mod):
    params = [p for p in mod.parameters()]
    def f():
        torch.manual_seed(0)
        if mode == "perstep":
            for p in params: p.grad = None
            x.grad = None
            with torch.autocast("cpu", torch.bfloat16):
                out = mod(**inputs)
            BlockBench.loss_of(out).backward()
        else:
            BlockBench.loss_of(mod(**inputs)).backward()
    return f
ws = [m.weight for m in bb.dense.modules() if isinstance(m, torch.nn.Linear)]
def casts():
    with torch.no_grad():
        for w in ws: w.to(torch.bfloat16).to(torch.float32)
fns = {"dense": step(bb.dense), "routed": step(bb.block), "casts": casts}
if mode == "oneregion":
    with torch.autocast("cpu", torch.bfloat16):
        ts = time_pairs(fns, torch.device("cpu"), rounds)
else:
    ts = time_pairs(fns, torch.device("cpu"), rounds)
plan = bb.block.ratio.two_bin([0], N)
ka, kb = (v / N for v in plan.k[0])
ideal = bb.ideal(kappa, two_bin=(ka, kb))
fr = [d / r / ideal for d, r in zip(ts["dense"], ts["routed"])]
frc = [(c + (d - c) / ideal) / r for d, r, c in zip(ts["dense"], ts["routed"], ts["casts"])]
print(mode, kind, B, "dense", [round(v, 2) for v in ts["dense"]], "routed", [round(v, 2) for v in ts["routed"]],
      "casts", [round(v, 3) for v in ts["casts"]], f"ideal {ideal:.3f} frac {statistics.median(fr)*100:.1f} casts-fixed {statistics.median(frc)*100:.1f}", flush=True)
