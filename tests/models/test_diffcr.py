"""DiffCR modules and the diffusers drop-in (tiny random PixArt / DiT, CPU, no downloads)."""
import copy
import hashlib
import json

import pytest
import torch

import diffcr
from diffcr import DiffCRConfig
from diffcr.modules import DifferentiableRatio, Router

from tiny_models import make, set_ratios, tiny_dit, tiny_pixart  # noqa: F401

B = 2


def inputs(kind, t=(100, 900), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(t), 4, 8, 8, generator=g, dtype=dtype)
    tt = torch.tensor(t)
    if kind == "pixart":
        return dict(hidden_states=x, encoder_hidden_states=torch.randn(len(t), 5, 32, generator=g,
                                                                       dtype=dtype),
                    timestep=tt)
    return dict(hidden_states=x, timestep=tt, class_labels=torch.tensor([1, 3, 5, 7][:len(t)]))


def run(model, kw):
    return model(**kw).sample


KINDS = ["pixart", "dit"]


# ------------------------------------------------------------------ config
def test_config_defaults_and_json_roundtrip():
    c = DiffCRConfig()
    assert c.bins == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert c.num_regions == 4 and c.lam == 0.3 and c.gate == "sigmoid2x"
    c2 = DiffCRConfig(bins=[1.0, 0.5, 0.25], num_regions=2, routed_blocks=[1, 0],
                      target_kept_ratio=0.5)
    assert c2.bins == (0.25, 0.5, 1.0) and c2.routed_blocks == (0, 1)
    assert DiffCRConfig.from_json(c2.to_json()) == c2
    assert json.loads(c2.to_json())["bins"] == [0.25, 0.5, 1.0]


@pytest.mark.parametrize("kw,match", [
    (dict(bins=[0.5]), "at least two"),
    (dict(bins=[0.0, 0.5]), r"\(0, 1\]"),
    (dict(bins=[0.5, 1.2]), r"\(0, 1\]"),
    (dict(bins=[0.5, 0.2, 0.9]), "sorted"),
    (dict(bins=[0.5, 0.5, 1.0]), "repeat"),
    (dict(num_regions=0), "num_regions"),
    (dict(num_regions=2.5), "num_regions"),
    (dict(target_kept_ratio=0.05), "target_kept_ratio"),
    (dict(gate="relu"), "gate"),
    (dict(lam=-1), "lam"),
    (dict(routed_blocks=[0, 0]), "repeats"),
    (dict(routed_blocks=[-1]), "routed_blocks"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(lam=float("inf")), "lam must be a finite number"),
    (dict(router_init_std=float("nan")), "router_init_std must be a finite number"),
    (dict(lam="0.3"), "lam must be a finite number, got '0.3'"),
    (dict(target_kept_ratio=True), "target_kept_ratio must be a finite number"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        DiffCRConfig(**kw)


def test_config_rejects_unknown_json_field():
    with pytest.raises(ValueError, match="unknown DiffCRConfig field"):
        DiffCRConfig.from_dict({"bins": [0.5, 1.0], "regions": 3})


def test_region_of():
    c = DiffCRConfig(num_regions=4, num_train_timesteps=1000)
    assert [c.region_of(t) for t in (0, 249, 250, 999, 1000, 5000)] == [0, 0, 1, 3, 3, 3]
    assert DiffCRConfig(num_regions=4, num_train_timesteps=1.0).region_of(0.6) == 2


# ------------------------------------------------------------------ modules
def test_router_gate_variants():
    x = torch.randn(2, 5, 8)
    r2 = Router(8, "sigmoid2x")
    assert torch.equal(r2.gate_factor(r2(x)), torch.ones(2, 5))
    r1 = Router(8, "sigmoid", init_std=0.5)
    s = r1(x)
    torch.testing.assert_close(s, torch.sigmoid(x @ r1.weight))
    torch.testing.assert_close(r1.gate_factor(s), s)


def test_two_bin_weights_and_bins():
    r = DifferentiableRatio(3, [0.1, 0.5, 0.75, 1.0])
    with torch.no_grad():
        r.kept.copy_(torch.tensor([1.0, 0.6, 0.5]))
    plan = r.two_bin([0, 1, 2], num_tokens=100)
    assert plan.k == [[75, 100], [50, 75], [50, 75]]
    torch.testing.assert_close(plan.weights, torch.tensor([[0.0, 1.0], [0.6, 0.4], [1.0, 0.0]]))
    assert r.nearest_bins() == [1.0, 0.5, 0.5]


def test_ratio_gradient_alive_at_init_and_projection():
    r = DifferentiableRatio(2, [0.5, 1.0])
    r.two_bin([0, 1], 10).weights[:, 1].sum().backward()
    assert (r.kept.grad != 0).all(), "a ratio initialised at the top bin must get a gradient"
    with torch.no_grad():
        r.kept.copy_(torch.tensor([1.3, 0.2]))
    assert r.kappa().tolist() == [1.0, 0.5]
    r.project_()
    assert r.kept.tolist() == [1.0, 0.5]


# ------------------------------------------------------------------ conversion = identity at init
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_converted_zero_router_kappa1_reproduces_model(kind, mode):
    model = make(kind)
    getattr(model, mode)()  # (DiT drops class labels at random in train mode: same seed below)
    kw = inputs(kind)
    torch.manual_seed(0)
    with torch.no_grad():
        expect = run(model, kw)
    diffcr.convert(model, DiffCRConfig(gate="sigmoid2x"))
    torch.manual_seed(0)
    with torch.no_grad():
        out = run(model, kw)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_unchanged_except_added(kind):
    model = make(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diffcr.convert(model)
    after = model.state_dict()
    added = set(after) - set(before)
    assert set(before) <= set(after)
    assert added == {f"transformer_blocks.{i}.{n}" for i in range(2)
                     for n in ("router.weight", "ratio.kept")}
    for k, v in before.items():
        assert torch.equal(after[k], v)
    assert hasattr(model.transformer_blocks[0], "norm1")


@pytest.mark.parametrize("kind", KINDS)
def test_revert_restores_exactly(kind):
    model = make(kind)
    kw = inputs(kind)
    pre_hooks = dict(model._forward_pre_hooks)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expect = run(model, kw)
    diffcr.convert(model)
    set_ratios(model, 0.3)
    diffcr.revert(model)
    assert not diffcr.is_converted(model)
    assert all(type(b).__name__ == "BasicTransformerBlock" for b in model.transformer_blocks)
    assert dict(model._forward_pre_hooks) == pre_hooks
    assert all(len(b.ff._forward_hooks) == 0 for b in model.transformer_blocks)
    assert model.state_dict().keys() == sd.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    with torch.no_grad():
        assert torch.equal(run(model, kw), expect)
    diffcr.convert(model)  # convertible again


def test_routed_blocks_subset_and_model_copies():
    model = make("pixart", layers=3)
    diffcr.convert(model, DiffCRConfig(routed_blocks=[1]))
    assert list(diffcr.routed_blocks(model)) == [1]
    assert type(model.transformer_blocks[0]).__name__ == "BasicTransformerBlock"
    clone = copy.deepcopy(model)  # no handles or weakrefs in the converted model
    set_ratios(model, 0.4)
    kw = inputs("pixart")
    with torch.no_grad():
        assert not torch.equal(run(clone, kw), run(model, kw))


# ------------------------------------------------------------------ refusals
def test_convert_refuses_unsupported_models_and_blocks():
    with pytest.raises(TypeError, match="supports PixArtTransformer2DModel"):
        diffcr.convert(torch.nn.Linear(4, 4))
    model = make("pixart")
    with pytest.raises(ValueError, match="out of range"):
        diffcr.convert(model, DiffCRConfig(routed_blocks=[5]))
    model.transformer_blocks[1] = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"transformer_blocks\[1\] is a Identity"):
        diffcr.convert(model)
    assert not diffcr.is_converted(model)


def test_convert_refuses_diffusers_hooks_and_chunking():
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    model = make("pixart")
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0])  # empty: fine
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match=r"diffusers hooks on \['transformer_blocks.0 "
                                         r"\(fbc_leader_block_hook"):
        diffcr.convert(model)
    assert not diffcr.is_converted(model)
    HookRegistry.check_if_exists_or_initialize(model).remove_hook("fbc_leader_block_hook")
    HookRegistry.check_if_exists_or_initialize(model).remove_hook("fbc_block_hook")
    diffcr.convert(model)  # removed hooks: converts
    model = make("dit")
    model.transformer_blocks[0].set_chunk_feed_forward(4, 1)
    with pytest.raises(ValueError, match="chunking"):
        diffcr.convert(model)
    model = make("dit")
    diffcr.convert(model)
    with pytest.raises(ValueError, match="already converted"):
        diffcr.convert(model)


def test_block_without_captured_timestep_says_how():
    model = make("dit")
    diffcr.convert(model)
    blk = model.transformer_blocks[0]
    with pytest.raises(RuntimeError, match="set_timestep"):
        blk(torch.randn(1, 16, 16), timestep=torch.tensor([3]),
            class_labels=torch.tensor([1]))


# ------------------------------------------------------------------ routing behaviour
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_timesteps_route_each_sample_with_its_own_k(kind):
    model = make(kind)
    diffcr.convert(model, DiffCRConfig(num_regions=4, num_train_timesteps=1000))
    set_ratios(model, [0.2, 0.5, 0.7, 1.0])
    blk = model.transformer_blocks[0]
    seen = {}

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen["changed"] = (out != x).any(-1).sum(-1).tolist()

    h = blk.register_forward_hook(hook, with_kwargs=True)
    kw = inputs(kind, t=(100, 600, 999))
    with torch.no_grad():
        mixed = run(model, kw)
        h.remove()
        singles = [run(model, {k: v[i:i + 1] for k, v in kw.items()}) for i in range(3)]
    N = 16
    # regions 0, 2, 3 -> k = ceil(0.2 N), ceil(0.7 N), N tokens updated, the rest untouched
    assert seen["changed"] == [4, 12, N]
    for i in range(3):
        torch.testing.assert_close(mixed[i:i + 1], singles[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_output_depends_only_on_nearest_bin(kind):
    model = make(kind)
    diffcr.convert(model)
    kw = inputs(kind)
    outs = {}
    with torch.no_grad():
        for v in (0.48, 0.5, 0.53, 0.56):
            set_ratios(model, v)
            outs[v] = run(model, kw)
    assert torch.equal(outs[0.48], outs[0.5]) and torch.equal(outs[0.53], outs[0.5])
    assert not torch.allclose(outs[0.56], outs[0.5])


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_fixes_k_per_block_and_region(kind):
    model = make(kind)
    diffcr.convert(model)
    set_ratios(model, [0.33, 0.5, 0.77, 1.0])
    kw = inputs(kind)
    with torch.no_grad():
        eval_out = run(model, kw)
    diffcr.freeze(model)
    assert diffcr.routing_state(model).blocks[0].frozen_bins == [0.3, 0.5, 0.8, 1.0]
    set_ratios(model, 0.1)  # frozen: parameters no longer matter
    for b in diffcr.routed_blocks(model).values():
        b.training = True  # nor does training mode of the blocks: one branch, fixed bins
    with torch.no_grad():
        frozen_out = run(model, kw)
    torch.testing.assert_close(frozen_out, eval_out, rtol=0, atol=0)
    diffcr.unfreeze(model)
    with torch.no_grad():
        assert not torch.equal(run(model.eval(), kw), frozen_out)


def test_sigmoid_gate_changes_the_mlp_branch_only_by_the_score():
    model = make("dit")
    kw = inputs("dit")
    with torch.no_grad():
        dense = run(model, kw)
    diffcr.convert(model, DiffCRConfig(gate="sigmoid"))
    with torch.no_grad():
        out = run(model, kw)
    assert not torch.allclose(out, dense, atol=1e-3)  # MLP branch scaled by s ~ 0.5


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_routers_and_used_ratios(kind):
    model = make(kind)
    diffcr.convert(model, DiffCRConfig(num_regions=4))
    set_ratios(model, 0.65)
    model.train()
    kw = inputs(kind, t=(100, 900))  # regions 0 and 3
    (run(model, kw).square().mean() + diffcr.ratio_loss(model)).backward()
    for b in diffcr.routed_blocks(model).values():
        assert b.router.weight.grad is not None and b.router.weight.grad.abs().sum() > 0
        g = b.ratio.kept.grad
        assert g[0] != 0 and g[3] != 0, g
        assert g[1] == 0 and g[2] == 0, "unused regions must get no gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_ratio_gradient_matches_finite_difference_float64(kind):
    model = make(kind).double()
    diffcr.convert(model, DiffCRConfig(num_regions=2, param_dtype="float64"))
    model.train()
    set_ratios(model, 0.56)  # inside the bracket [0.5, 0.6]: output is linear in kappa there
    kw = inputs(kind, t=(100, 700), dtype=torch.float64)
    G = torch.randn(run(model, kw).shape, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    blk = model.transformer_blocks[1]

    def f():
        torch.manual_seed(0)  # same DiT label dropout in every evaluation
        return (run(model, kw) * G).sum()

    f().backward()
    analytic = blk.ratio.kept.grad.clone()
    h = 1e-6  # the layers after the block are nonlinear: keep the O(h^2) error small
    for r in range(2):
        with torch.no_grad():
            blk.ratio.kept[r] += h
            fp = f().item()
            blk.ratio.kept[r] -= 2 * h
            fm = f().item()
            blk.ratio.kept[r] += h
        numeric = (fp - fm) / (2 * h)
        assert abs(numeric) > 1e-6
        assert abs(analytic[r].item() - numeric) <= 1e-5 * max(1.0, abs(numeric)), \
            (r, analytic[r].item(), numeric)


def test_ratio_loss_alone_moves_mean_ratio_to_target():
    model = make("dit")
    diffcr.convert(model, DiffCRConfig(num_regions=4, lam=1.0))
    model.train()
    opt = torch.optim.Adam(diffcr.ratio_parameters(model), lr=0.02)
    diffcr.attach_ratio_projection(opt, model)
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        t = torch.randint(0, 1000, (4,), generator=g)
        kw = dict(hidden_states=torch.randn(4, 4, 8, 8, generator=g), timestep=t,
                  class_labels=torch.randint(0, 10, (4,), generator=g))
        run(model, kw)  # records the ratios each sample uses
        loss = diffcr.ratio_loss(model, target=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, table = diffcr.ratio_table(model)
    assert abs(table.mean().item() - 0.5) < 0.03, table
    assert (table >= 0.1).all() and (table <= 1.0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    grads = []
    for ckpt in (False, True):
        model = make(kind)
        diffcr.convert(model)
        set_ratios(model, 0.55)
        model.train()
        if ckpt:
            model.enable_gradient_checkpointing()
        kw = inputs(kind)
        (run(model, kw).square().mean() + diffcr.ratio_loss(model)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ tables and persistence
def test_ratio_table_and_format():
    model = make("pixart", layers=3)
    diffcr.convert(model, DiffCRConfig(num_regions=2))
    set_ratios(model, [0.4, 0.9])
    idx, table = diffcr.ratio_table(model)
    assert idx == [0, 1, 2] and table.shape == (3, 2)
    torch.testing.assert_close(table, torch.tensor([[0.4, 0.9]] * 3))
    text = diffcr.format_ratio_table(model)
    assert "0.400" in text and "mean kept ratio: 0.650" in text


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(kind, tmp_path):
    model = make(kind)
    diffcr.convert(model, DiffCRConfig(num_regions=3, gate="sigmoid"))
    set_ratios(model, [0.3, 0.6, 0.9])
    kw = inputs(kind)
    with torch.no_grad():
        expect = run(model, kw)
    diffcr.save(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["diffcr.json",
                                                                  "diffcr.safetensors"]
    fresh = make(kind)  # same base weights, not converted: load converts it
    diffcr.load(fresh, tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, kw), expect, rtol=0, atol=0)
    # frozen state round-trips too
    diffcr.freeze(model)
    diffcr.save(model, tmp_path / "ck2")
    fresh2 = make(kind)
    diffcr.load(fresh2, tmp_path / "ck2")
    assert diffcr.routing_state(fresh2).frozen
    assert diffcr.routing_state(fresh2).blocks[0].frozen_bins == [0.3, 0.6, 0.9]


def test_load_mismatch_errors_leave_model_unchanged(tmp_path):
    model = make("pixart")
    diffcr.convert(model, DiffCRConfig(num_regions=3))
    diffcr.save(model, tmp_path / "ck")
    other = make("pixart", layers=3)
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(diffcr.CheckpointError, match="num_blocks: checkpoint 2, model 3"):
        diffcr.load(other, tmp_path / "ck")
    assert not diffcr.is_converted(other) and other.state_dict().keys() == sd.keys()
    with pytest.raises(diffcr.CheckpointError, match="model_class"):
        diffcr.load(make("dit"), tmp_path / "ck")
    conv = make("pixart")
    diffcr.convert(conv, DiffCRConfig(num_regions=2))
    before = [p.clone() for p in diffcr.ratio_parameters(conv)]
    with pytest.raises(diffcr.CheckpointError, match="num_regions: checkpoint 3, model 2"):
        diffcr.load(conv, tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(before, diffcr.ratio_parameters(conv)))


def test_load_rejects_truncated_and_tampered_files(tmp_path):
    model = make("dit")
    diffcr.convert(model)
    ck = diffcr.save(model, tmp_path / "ck")
    data = (ck / "diffcr.safetensors").read_bytes()
    (ck / "diffcr.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(diffcr.CheckpointError, match="truncated or corrupt"):
        diffcr.load(make("dit"), ck)
    ck = diffcr.save(model, tmp_path / "ck2")
    meta = json.loads((ck / "diffcr.json").read_text())
    meta["config"]["bins"] = [0.5, 0.2]
    (ck / "diffcr.json").write_text(json.dumps(meta))
    with pytest.raises(diffcr.CheckpointError, match="invalid config"):
        diffcr.load(make("dit"), ck)
    with pytest.raises(diffcr.CheckpointError, match="not a DiffCR checkpoint"):
        diffcr.load(make("dit"), tmp_path / "nothing")


def test_load_checks_finiteness_in_the_model_dtype(tmp_path):
    """A value finite in the file (float64 1e300) but not in the parameter's float32 is
    refused before anything changes, instead of loading as inf."""
    from safetensors.torch import load_file, save_file

    model = make("dit")
    diffcr.convert(model)
    ck = diffcr.save(model, tmp_path / "ck")
    tensors = load_file(str(ck / "diffcr.safetensors"))
    key = next(k for k in tensors if k.endswith("router.weight"))
    t = tensors[key].double()
    t[0] = 1e300
    tensors[key] = t
    save_file(tensors, str(ck / "diffcr.safetensors"),
              metadata={"format": "diffcr", "version": "1"})
    meta = json.loads((ck / "diffcr.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256((ck / "diffcr.safetensors").read_bytes()).hexdigest()
    (ck / "diffcr.json").write_text(json.dumps(meta))  # a consistent file: the value is the issue
    fresh = make("dit")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(diffcr.CheckpointError, match="not finite in the model's torch.float32"):
        diffcr.load(fresh, ck)
    assert not diffcr.is_converted(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_model_deep_copies_right_after_a_training_forward():
    model = make("dit")
    diffcr.convert(model)
    model.train()
    run(model, inputs("dit")).sum().backward()
    clone = copy.deepcopy(model)  # e.g. an EMA copy; the per-forward ratios are not copied
    assert diffcr.is_converted(clone)
    with pytest.raises(RuntimeError, match="no forward"):
        diffcr.ratio_loss(clone)


@pytest.mark.parametrize("tamper,pattern", [
    (lambda m: m.update(config=5), "'config' has the wrong type"),
    (lambda m: m.pop("config"), "no 'config' object"),
    (lambda m: m["config"].update(num_regions="x"), "invalid config"),
    (lambda m: m["config"].update(bins={"a": 1}), "invalid config"),
    (lambda m: m.update(model=[1]), "'model' has the wrong type"),
    (lambda m: m.update(frozen_bins={"a": 1}), "frozen_bins"),
    (lambda m: m.update(frozen_bins={"0": 1, "1": [0.5]}), "frozen_bins"),
    (lambda m: m.update(tensors_sha256=7), "'tensors_sha256' has the wrong type"),
    (lambda m: m.update(model={}), r"model.model_class is missing or invalid \(None\)"),
    (lambda m: m["model"].update(num_blocks="2"), "model.num_blocks is missing or invalid"),
    (lambda m: m["model"].update(hidden_size=0), "model.hidden_size is missing or invalid"),
    (lambda m: m["config"].update(routed_blocks=[0, 5]), r"routed_blocks \[5\] out of range"),
    (lambda m: m["model"].update(num_blocks=1), "block_names do not match"),
    (lambda m: m.update(block_names={"0": "transformer_blocks.0"}), "block_names do not match"),
    (lambda m: m.update(block_names=["x"]), "'block_names' has the wrong type"),
    ("nested", "not valid JSON"),
])
def test_load_gives_checkpoint_error_for_every_malformed_json(tmp_path, tamper, pattern):
    model = make("dit")
    diffcr.convert(model)
    ck = diffcr.save(model, tmp_path / "ck")
    if tamper == "nested":
        (ck / "diffcr.json").write_text("[" * 100000 + "]" * 100000)
    else:
        meta = json.loads((ck / "diffcr.json").read_text())
        tamper(meta)
        (ck / "diffcr.json").write_text(json.dumps(meta))
    fresh = make("dit")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(diffcr.CheckpointError, match=pattern):
        diffcr.load(fresh, ck)
    assert not diffcr.is_converted(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_load_detects_in_range_corruption_by_checksum(tmp_path):
    """A bit flip inside a tensor that keeps the value finite and in range is caught by the
    SHA-256 recorded at save time."""
    model = make("dit")
    diffcr.convert(model)
    ck = diffcr.save(model, tmp_path / "ck")
    data = bytearray((ck / "diffcr.safetensors").read_bytes())
    data[-2] ^= 0x01  # lowest mantissa bits of the last float32: still finite, still in range
    (ck / "diffcr.safetensors").write_bytes(bytes(data))
    with pytest.raises(diffcr.CheckpointError, match="does not match the checksum"):
        diffcr.load(make("dit"), ck)
    meta = json.loads((ck / "diffcr.json").read_text())
    meta.pop("tensors_sha256")  # a checkpoint from before checksums: loads as before
    (ck / "diffcr.json").write_text(json.dumps(meta))
    diffcr.load(make("dit"), ck)
