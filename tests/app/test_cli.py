"""The command line: train (embedded demo in quick mode, real use on a tiny folder, under
torchrun with two processes), inspect, generate, and one-line errors for bad input."""
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

CWD = tempfile.gettempdir()  # run outside the repository: the installed package is imported


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "diffcr", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=CWD,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def cli_in_process(capsys, *args):
    """``diffcr ARGS`` through ``diffcr.app.cli.main`` in this process: the same code as
    :func:`cli` without the seconds of a fresh interpreter (bad-argument tests, which stop
    before any work). An unexpected exception propagates and fails the test, as a traceback
    would fail :func:`one_line_error`."""
    import types

    from diffcr.app.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def one_line_error(r, prog="diffcr"):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prog), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny DiT config (8x8 RGB, patch 2) and an image folder of 3 classes."""
    from tiny_models import write_tiny_dit_folder

    return write_tiny_dit_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = cli("train", "--quick", "--out", out, "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_train_demo_quick_writes_every_output(demo_out):
    out, r = demo_out
    for f in ("ratios.png", "router.png", "samples.png", "tradeoff.png", "inpaint.png"):
        data = (out / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    m = json.loads((out / "metrics.json").read_text())
    from diffcr.app.demo.peers import cache_available

    from diffcr.app.demo.run import DEMO_LOW, DEMO_TC, DEMO_TC_POINTS, DEMO_TEACHER

    trained = {"dense", "DiffCR-LT", DEMO_TEACHER, DEMO_LOW, "MoD"}
    first = DEMO_TC_POINTS[0]
    cached = {f"{DEMO_LOW} + token cache /{first}", f"{DEMO_TC} /{first}"}
    expected = trained | cached
    from diffcr.app.demo.peers import CacheSetting
    from diffcr.app.demo.run import DEMO_CACHES, DEMO_STACKS

    for kind, value in DEMO_CACHES[::3]:  # the quick demo's caches
        if cache_available(kind):
            expected.add(CacheSetting(kind, value).label)
    kind, value = DEMO_STACKS[0]
    if cache_available(kind):
        expected.add(f"DiffCR-LT + {CacheSetting(kind, value).label}")
    assert set(m["methods"]) == expected
    assert {m["methods"][n]["kind"] for n in cached} == {"diffcr+tokencache"}
    # the frontier: at least one row, none of them dominated by another
    front = [n for n, r in m["methods"].items() if r.get("on_frontier")]
    assert front
    for n in front:
        a = m["methods"][n]
        assert not any(o["class_accuracy"] >= a["class_accuracy"]
                       and o["speedup_vs_dense"] >= a["speedup_vs_dense"]
                       and (o["class_accuracy"], o["speedup_vs_dense"])
                       != (a["class_accuracy"], a["speedup_vs_dense"])
                       for o in m["methods"].values())
    for name, row in m["methods"].items():
        keys = ["classifier_fid", "class_accuracy", "mean_kept_ratio", "speedup_vs_dense"]
        if name in trained:
            keys.append("heldout_denoising_loss")
        else:
            assert row["heldout_denoising_loss"] is None
        for k in keys:
            assert isinstance(row[k], float) and row[k] == row[k], (name, k)
        assert len(row["class_accuracy_per_seed"]) == 2 and len(row["sampling_s"]) == 2
    assert m["methods"]["dense"]["speedup_vs_dense"] == 1.0
    assert m["methods"]["MoD"]["mean_kept_ratio"] == pytest.approx(0.5)
    # the inpainting task: dense, DiffCR-LT with and without mask-aware routing, the
    # token-cache variant with it, the caches
    from diffcr.app.demo.run import DEMO_INPAINT_CONTEXT

    inp = m["inpainting"]["methods"]
    ctx = f"DiffCR-LT + mask, context {DEMO_INPAINT_CONTEXT[-1]:g}"
    want = {"dense", "DiffCR-LT", ctx, f"{DEMO_TC} /{first} + mask"} | {
        CacheSetting(k, v).label for k, v in DEMO_CACHES if cache_available(k)}
    assert set(inp) == want
    for row in inp.values():
        assert len(row["masked_error_per_seed"]) == 2 and row["masked_error"] >= 0.0
        assert 0.0 < row["mean_kept_ratio"] <= 1.0
    # a quarter or more of the tokens are context, half of which the masked rows skip
    assert inp[ctx]["mean_kept_ratio"] < 1.0
    for name, row in inp.items():  # mask-aware routing computes every masked token-block
        if "+ mask" in name:
            assert row["masked_tokens_skipped"] == 0.0, name
        elif name == "DiffCR-LT":
            assert 0.0 <= row["masked_tokens_skipped"] <= 1.0
        else:
            assert "masked_tokens_skipped" not in row, name
    assert "inpainting (" in r.stdout and "masked MSE" in r.stdout
    assert (out / "diffcr" / "diffcr.safetensors").exists()
    assert (out / "model" / "config.json").exists()
    sched = json.loads((out / "model" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert "DiffCR-LT" in r.stdout and "target kept ratio" in r.stdout
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| method |") and table[0].endswith("| on the frontier |")
    assert len(table) >= 2 + len(expected)
    assert sum(line.startswith("| DiffCR-LT |") for line in table) == 2  # and inpainting
    assert any(line.startswith("| method | kept ratio | masked skipped | class accuracy |")
               for line in table)
    # the dense model came from the shipped checkpoint when the package has one
    from diffcr.app.demo.run import shipped_dense_path

    shipped = (shipped_dense_path() / "config.json").is_file()
    assert m["dense_model"].startswith("shipped" if shipped else "trained here")


def test_pretrain_only_writes_a_loadable_dense_model(tmp_path):
    r = cli("train", "--quick", "--pretrain-only", "--steps", "3", "--out", tmp_path,
            "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel.from_pretrained(str(tmp_path / "dense"))
    info = json.loads((tmp_path / "dense" / "training.json").read_text())
    assert info["steps"] == 3 and len(info["stages"]) == 1
    assert info["stages"][0]["recipe"]["prediction_type"] == "v_prediction"
    from diffcr.app.demo.run import DEMO_CONTINUE, DEMO_PATCH, DEMO_SIZE

    assert m.config.patch_size == DEMO_PATCH and m.config.sample_size == DEMO_SIZE
    assert "trained 3 steps" in r.stdout
    # a second stage continues from that folder and records both stages
    r = cli("train", "--quick", "--pretrain-only", "--steps", "2", "--continue-from",
            tmp_path / "dense", "--out", tmp_path / "more", "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "more" / "dense" / "training.json").read_text())
    assert info["steps"] == 5 and [st["steps"] for st in info["stages"]] == [3, 2]
    assert info["stages"][1]["recipe"]["lr"] == DEMO_CONTINUE["lr"]
    assert "--continue-from dense" in info["stages"][1]["command"]
    m2 = DiTTransformer2DModel.from_pretrained(str(tmp_path / "more" / "dense"))
    moved = [not torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters())]
    assert any(moved)


def test_inspect_and_generate_from_demo_checkpoint(demo_out, tmp_path):
    out, _ = demo_out
    r = cli("inspect", out / "diffcr")
    assert r.returncode == 0, r.stderr
    assert "kept ratio per block and timestep region" in r.stdout and "mean kept ratio" in r.stdout
    r = cli("generate", "--model", out / "model", "--diffcr", out / "diffcr", "--out", tmp_path,
            "--classes", "0,2", "--per-class", "2", "--steps", "3")
    assert r.returncode == 0, r.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 4 and pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_real_training_and_resume(tiny_setup, tmp_path):
    root = tiny_setup
    r = cli("train", "--model", root / "dit.json", "--data", root / "data", "--steps", "4",
            "--batch", "4", "--out", tmp_path / "run", "--no-progress", "--regions", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("model/config.json", "diffcr/diffcr.json", "optimizer.safetensors",
              "train_state.json", "metrics.json", "diffcr-frozen/diffcr.json"):
        assert (tmp_path / "run" / f).exists(), f
    r = cli("train", "--model", root / "dit.json", "--data", root / "data", "--steps", "6",
            "--batch", "4", "--out", tmp_path / "run2", "--no-progress", "--regions", "2",
            "--resume", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run2" / "train_state.json").read_text())["step"] == 6


@pytest.mark.parametrize("args,needle", [
    (["train", "--data", "/nonexistent/folder"], "no such folder"),
    (["train", "--compression", "1.5"], "--compression"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--bins", "0.5,x"], "--bins"),
    (["train", "--regions", "two"], "--regions"),
    (["inspect", "/nonexistent/ckpt"], "not a DiffCR checkpoint"),
    (["bench", "--kappas", "1.5"], "--kappas"),
    (["bench", "--device", "cuda", "--prepack"], "--prepack is for CPU"),
    (["bench", "--model", "wan", "--tokens", "17"], "multiple of 1560"),
    (["bench", "--model", "flux", "--tokens", "17"], "must be a square number"),
    (["bench", "--model", "wan", "--masked"], "--masked is for image blocks"),
    (["bench", "--autocast", "bf16", "--dtype", "bf16"], "--autocast bf16 runs over fp32"),
    (["bench", "--autocast", "bf16", "--prepack"], "not use"),
    (["bench", "--training-only", "--no-training"], "leave nothing to time"),
    (["nonsense"], "invalid choice"),
    (["train", "--lr", "nan"], "--lr must be a finite number"),
    (["train", "--lam", "inf"], "--lam must be a finite number"),
    (["train", "--save-every", "-1"], "--save-every must be >= 0"),
    (["train", "--threads", "0"], "--threads must be >= 1"),
    (["train", "--pretrain-only", "--model", sys.executable], "takes no --model/--data"),
    (["train", "--out", sys.executable], "exists and is not a folder"),
    (["train", "--continue-from", "."], "--continue-from goes with --pretrain-only"),
    (["train", "--pretrain-only", "--continue-from", "/nonexistent/d"], "not a dense DiT"),
    (["generate", "--model", "m", "--diffcr", "d", "--per-class", "0"], "--per-class"),
    (["generate", "--model", "m", "--diffcr", "d", "--steps", "0"], "--steps must be >= 1"),
    (["generate", "--model", "m", "--diffcr", "d", "--guidance", "nan"], "--guidance"),
    (["generate", "--model", "m", "--diffcr", "d", "--classes", "a,b"], "class ids"),
    (["generate", "--model", "m", "--diffcr", "d", "--out", sys.executable], "not a folder"),
    (["generate", "--model", "/nonexistent/m", "--diffcr", "d"], "no such folder"),
])
def test_bad_arguments_give_one_line_errors(args, needle, capsys):
    r = cli_in_process(capsys, *args)
    line = one_line_error(r)
    assert needle in line


def test_bench_under_autocast_keeps_the_fused_path(capsys):
    """``diffcr bench --autocast bf16``: fp32 weights, every timed call under autocast (what
    ``--mixed-precision bf16`` trains with); the routed block and the training step run
    fused there, and the JSON says which autocast dtype ran."""
    import json

    r = cli_in_process(capsys, "bench", "--model", "dit-demo", "--tokens", "16", "--rounds",
                       "1", "--kappas", "0.5", "--autocast", "bf16", "--no-naive",
                       "--no-overhead", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["autocast"] == "bf16" and out["config"]["dtype"] == "fp32"
    assert [b["path"] for b in out["blocks"]] == ["fused"]
    assert out["training"]["path"] == "fused"
    casts = out["autocast_weight_casts"]  # the per-call fixed cost autocast adds to both
    assert casts["weights"] > 0 and casts["cast_ms"] > 0 and "bfloat16" in casts["dtype"]
    assert out["blocks"][0]["fraction_of_ideal_casts_fixed"] > 0
    t = out["training"]
    assert "bfloat16" in t["autocast"] and t["casts_ms"] > 0
    assert t["fraction_of_ideal_casts_fixed"] > 0
    rounds = len(t["dense_rounds_ms"])  # the median's rounds, recorded
    assert rounds == len(t["routed_rounds_ms"]) == len(t["casts_rounds_ms"]) == 3
    assert t["casts_ms"] == pytest.approx(sorted(t["casts_rounds_ms"])[1])


def test_bench_training_steps_each_open_their_own_autocast_region(capsys, monkeypatch):
    """A training loop under ``--mixed-precision`` runs each forward in its own autocast region
    (autocast's cache of weight casts dies with it) and the loss and backward outside: the
    bench's training step does the same, also when ``diffcr bench --autocast`` runs the
    inference rows in one region, and sets the gradients to None before each step."""
    import json

    import torch

    from diffcr.app import bench

    seen = {"forward": [], "loss": [], "grad": []}
    make = bench.make_block_bench

    def spied(*a, **k):
        bb = make(*a, **k)

        def record(mod, args):
            seen["forward"].append(torch.is_autocast_enabled("cpu"))
            seen["grad"].append(all(p.grad is None for p in mod.parameters()))

        for m in (bb.dense, bb.block):
            m.register_forward_pre_hook(record)
        return bb

    loss_of = bench.BlockBench.loss_of
    monkeypatch.setattr(bench, "make_block_bench", spied)
    monkeypatch.setattr(bench.BlockBench, "loss_of", staticmethod(
        lambda out: seen["loss"].append(torch.is_autocast_enabled("cpu")) or loss_of(out)))
    r = cli_in_process(capsys, "bench", "--model", "dit-demo", "--tokens", "16", "--rounds",
                       "1", "--kappas", "0.5", "--autocast", "bf16", "--no-naive",
                       "--no-overhead", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["training"]["casts_ms"] > 0
    # the training bench's calls come last (a warm-up and three rounds of the dense and the
    # routed step): its last four forwards
    assert seen["forward"][-4:] == [True] * 4 and seen["grad"][-4:] == [True] * 4
    assert seen["loss"][-4:] == [False] * 4


def test_bench_training_only_times_the_training_step_alone(capsys):
    """``diffcr bench --training-only``: the two-bin training step, no inference rows; its
    ideal counts what the two bins share once (method §6)."""
    import json

    from diffcr.app import bench

    r = cli_in_process(capsys, "bench", "--model", "dit-demo", "--tokens", "16", "--rounds",
                       "1", "--training-only", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["blocks"] == [] and "overhead" not in out
    t = out["training"]
    assert t["path"] == "fused"
    ka, kb = t["bins"]
    D = 128  # the demo block
    both = bench.ideal_block_flops(ka * 16, D, 0) + bench.ideal_block_flops(kb * 16, D, 0)
    shared = 6 * D * D * min(ka, kb) * 16  # the smaller bin's q/k/v projections, once
    # (16 tokens: too few rows for the nested bins' attention, whose shared forward the ideal
    # would count too, method §6)
    assert t["ideal_speedup"] == pytest.approx(bench.ideal_block_flops(16, D, 0)
                                               / (both - shared))
    r = cli_in_process(capsys, "bench", "--model", "dit-demo", "--tokens", "16", "--rounds",
                       "1", "--training-only")
    assert r.returncode == 0 and "training step" in r.stdout and "kappa" not in r.stdout
    assert "median of 3 interleaved rounds; single rounds" in r.stdout


def test_corrupt_image_is_one_line_error_naming_the_file(tiny_setup, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_setup / "data", data)
    bad = next(data.glob("*/*.png"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    r = cli_in_process(capsys, "train", "--model", tiny_setup / "dit.json", "--data", data,
                       "--steps", "1", "--out", tmp_path / "out")
    line = one_line_error(r)
    assert "cannot read image" in line and bad.name in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_inspect_tampered_checkpoint_is_one_line_error(demo_out, tmp_path, capsys):
    import shutil

    out, _ = demo_out
    ck = tmp_path / "ck"
    shutil.copytree(out / "diffcr", ck)
    meta = json.loads((ck / "diffcr.json").read_text())
    meta["model"] = {}
    (ck / "diffcr.json").write_text(json.dumps(meta))
    assert "model.model_class is missing" in one_line_error(cli_in_process(capsys, "inspect", ck))


def test_empty_data_folder_is_one_line_error(tiny_setup, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)  # the default --out is relative
    r = cli_in_process(capsys, "train", "--model", tiny_setup / "dit.json", "--data",
                       tmp_path / "empty", "--steps", "1")
    assert "data" in one_line_error(r).lower()
    assert os.listdir(tmp_path) == ["empty"]  # refused before anything was written


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_training_keeps_ranks_identical(tiny_setup, tmp_path):
    """torchrun, two CPU processes (gloo): routers and ratios stay identical on both ranks (the
    training code all-gathers them at the end and records the comparison)."""
    root = tiny_setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "diffcr",
           "train", "--model", str(root / "dit.json"), "--data", str(root / "data"),
           "--steps", "3", "--batch", "2", "--out", str(tmp_path / "ddp"), "--no-progress",
           "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=CWD,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["ddp_params_identical_across_ranks"] is True
    # and the ratios really moved (the check compares trained values, not the init)
    assert m["mean_kept_ratio"] < 1.0
