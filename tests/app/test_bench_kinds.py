"""The block benchmarks of the compat-path families build real-size blocks (SD3.5-Large,
Flux.1, Wan 2.1 1.3B and 14B, Qwen-Image, HunyuanVideo) and measure them: checked here at a few tokens (the numbers themselves
belong to benchmarks/results, not to tests)."""
import pytest
import torch

pytest.importorskip("diffusers")
import diffcr  # noqa: E402
from diffcr.app import bench  # noqa: E402


@pytest.mark.parametrize("kind,N", [("sd3", 16), ("flux", 16), ("flux-single", 16),
                                    ("wan", 16), ("wan-14b", 16), ("qwenimage", 16),
                                    ("hunyuanvideo", 16)])
def test_joint_block_bench_runs_and_states_its_ideal(kind, N):
    torch.set_num_threads(1)
    bb = bench.make_block_bench(kind, N, 1, "cpu", torch.float32)
    assert bb.ideal(1.0) == pytest.approx(1.0)
    assert 1.0 < bb.ideal(0.5) < 2.0  # the text stream and text projections are not routed
    bb.set_kappa(0.5)
    with torch.no_grad():
        dense, routed = bb.run_dense(), bb.run_routed()
    img = diffcr.family_for(bb.model).hidden_states_of
    x = bb.inputs["hidden_states"]
    changed = (img(routed) != x).any(-1).sum().item()
    assert changed == bench.dk.kept_count(0.5, N)
    assert img(dense).shape == img(routed).shape
    row = bench.bench_blocks(kind, N, 1, kappas=(0.5,), rounds=1, prepack=False,
                             token_cache=True, bench=bb)[0]
    assert row["k"] == N // 2 and row["fraction_of_ideal"] > 0 and "naive_ms" not in row
    assert row["token_cache_ms"] > 0 and row["token_cache_bytes_moved"] == \
        (3 * N + 2 * row["k"]) * bb.D * 4
    assert not diffcr.routing_state(bb.model).token_cache  # turned off after timing


def test_demo_dit_block_bench_is_the_demo_models_block():
    """``--model dit-demo``: the block of the model ``diffcr train`` fine-tunes (D = 128)."""
    import json
    from pathlib import Path

    torch.set_num_threads(1)
    cfg = json.loads((Path(bench.__file__).parent / "demo" / "dense_dit" / "config.json")
                     .read_text())
    bb = bench.make_block_bench("dit-demo", 64, 2, "cpu", torch.float32)
    assert bb.D == cfg["num_attention_heads"] * cfg["attention_head_dim"] == 128
    row = bench.bench_blocks("dit-demo", 64, 2, kappas=(0.5,), rounds=1, prepack=False)[0]
    assert row["k"] == 32 and row["path"] == "fused" and row["fraction_of_ideal"] > 0


def test_cli_bench_choices_are_the_bench_kinds():
    from diffcr.app import cli

    bench_parser = cli.build_parser()._subparsers._group_actions[0].choices["bench"]
    model = next(a for a in bench_parser._actions if a.dest == "model")
    assert tuple(model.choices) == bench.KINDS
    assert set(bench.VIDEO_KINDS) <= set(bench.KINDS)


def test_lora_training_bench_puts_the_same_adapter_on_both_blocks():
    torch.set_num_threads(1)
    bb = bench.make_block_bench("pixart", 16, 1, "cpu", torch.float32)
    bench._lora_pair(bb, 4)
    lora = {n: p for n, p in bb.block.named_parameters() if ".lora_" in n}
    assert lora and all(p.abs().sum() > 0 for p in lora.values())
    assert {n for n, p in bb.dense.named_parameters() if p.requires_grad} == set(lora)
    bb.set_kappa(1.0)
    with torch.no_grad():
        torch.testing.assert_close(bb.run_routed(), bb.run_dense(), rtol=0, atol=0)


def test_video_token_counts_are_four_square_frames_or_whole_480p_frames():
    assert bench.video_shape(16) == (4, 2, 2)
    assert bench.video_shape(32760) == (21, 30, 52)  # Wan 480p, 81 frames
    with pytest.raises(ValueError, match="480p"):
        bench.video_shape(17)


def test_bench_kinds_import_without_torch():
    """The table of kinds (what the command line builds its choices from) and everything it
    imports leave torch unimported; bench.py serves the same table."""
    import os
    import subprocess
    import sys

    from diffcr.app import bench_kinds

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(bench_kinds.__file__)))
    # the diffcr package's own __init__ imports the library (and torch): stand-ins for the two
    # package modules, so that only bench_kinds and its own imports run
    code = ("import sys, types\n"
            f"pkg = {pkg!r}\n"
            "for name, path in (('diffcr', pkg), ('diffcr.app', pkg + '/app')):\n"
            "    m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m\n"
            "import diffcr.app.bench_kinds as k\n"
            "assert 'torch' not in sys.modules, sorted(sys.modules)\n"
            "print(len(k.KINDS))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == str(len(bench.KINDS)), r.stdout + r.stderr
    assert (bench.KINDS, bench.VIDEO_KINDS, bench.DESCRIPTIONS) == (
        bench_kinds.KINDS, bench_kinds.VIDEO_KINDS, bench_kinds.DESCRIPTIONS)
    assert set(bench_kinds.DESCRIPTIONS) == set(bench_kinds.KINDS)


def test_masked_bench_times_the_box_plus_the_context_share():
    """``diffcr bench --masked``: the routed block computes the box and ``context`` of the
    rest, and its ideal is that of routing at k / N."""
    torch.set_num_threads(1)
    bb = bench.make_block_bench("dit-demo", 64, 2, "cpu", torch.float32)
    rows = bench.bench_masked("dit-demo", 64, 2, fractions=(0.25,), contexts=(0.5,), rounds=1,
                              prepack=False, bench=bb)
    (row,) = rows
    assert row["masked"] == 16 == int(bench.box_mask(8, 0.25).sum())
    # 16 masked tokens are a multiple of the bucket (ceil(64 / 32) = 2): no rounding up
    assert row["k"] == 16 + bench.dk.kept_count(0.5, 64 - 16) and row["path"] == "fused"
    assert row["ideal_speedup"] == pytest.approx(bb.ideal(row["k"] / 64))
    assert diffcr.routing_state(bb.model).keep_mask is None  # off after timing
    with pytest.raises(ValueError, match="video block"):
        bench.bench_masked("wan", 16)


def _counted_flops(fn) -> int:
    """FLOPs of ``fn()`` as torch's FlopCounterMode counts them (matmuls, and the CPU flash
    attention through the counter's own SDPA formula, which it does not map)."""
    import torch.utils.flop_counter as fc

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    with torch.no_grad(), fc.FlopCounterMode(display=False, custom_mapping={
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", ["pixart", "dit", "sd3", "flux", "flux-single", "wan",
                                  "qwenimage", "hunyuanvideo"])
def test_the_ideal_cost_model_counts_what_the_blocks_compute(kind):
    """The cost model behind every fraction of ideal (method §6), against torch's flop counter
    run on the blocks themselves:

    - what the dense block costs per image token (and in attention) is what the model says.
      Differences of two token counts cancel what is paid once per sample (the adaLN
      modulation linears), which the model leaves out;
    - the two-bin training pass of the fused routed block computes what the ideal counts for
      both bins with their shared work once: no more (work computed twice that the ideal
      shares) and no less (sharing the ideal claims and the block does not do), up to the
      per-sample modulation and the router."""
    from diffcr.convert import unfreeze

    import gc

    torch.set_num_threads(1)
    # one real-size block in memory at a time (Flux's weigh 1.4 GB, its bench holds two); a
    # converted model sits in reference cycles, which few Python allocations leave uncollected
    gc.collect()
    small = bench.make_block_bench(kind, 16, 1, "cpu", torch.float32)
    counted_small = _counted_flops(small.run_dense)
    del small
    gc.collect()
    large = bench.make_block_bench(kind, 64, 1, "cpu", torch.float32)
    counted = _counted_flops(large.run_dense) - counted_small
    assert large.flops(64) - large.flops(16) == pytest.approx(counted, rel=1e-9)

    unfreeze(large.model)
    with torch.no_grad():
        large.block.ratio.kept.fill_(0.55)
    large.model.train()
    two_bin = _counted_flops(large.run_routed)
    assert large.path() == "fused"
    ka, kb = (k / 64 for k in large.block.ratio.two_bin([0], 64).k[0])
    assert ka != kb
    ideal_cost = large.two_bin_forward_flops(ka, kb)
    del large
    gc.collect()
    assert two_bin == pytest.approx(ideal_cost, rel=1.5e-2)
