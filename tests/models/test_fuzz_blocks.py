"""Property-based fuzzing of converted blocks (hypothesis): random tiny PixArt / DiT models,
batch sizes, timesteps (so ragged k per sample), ratios per region and training/eval mode. For
every draw: no crash, the fused path equals the compat path, inputs are not modified, and a
repeated call is bitwise identical on CPU."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("diffusers", reason="diffusers is not installed (tests of converted models)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel  # noqa: E402

import diffcr  # noqa: E402
from diffcr import DiffCRConfig  # noqa: E402

from tiny_models import _randomise_weights  # noqa: E402


def _model(kind, heads, head_dim, layers, side, patch, seed):
    torch.manual_seed(seed)
    if kind == "pixart":
        m = PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                     in_channels=4, out_channels=8, num_layers=layers,
                                     sample_size=side, patch_size=patch,
                                     cross_attention_dim=heads * head_dim,
                                     caption_channels=12, norm_type="ada_norm_single",
                                     use_additional_conditions=False)
    else:
        m = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=8, num_layers=layers,
                                  sample_size=side, patch_size=patch, num_embeds_ada_norm=5)
    return _randomise_weights(m.eval())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["pixart", "dit"]), heads=st.integers(1, 2),
       head_dim=st.sampled_from([4, 8]), layers=st.integers(1, 2),
       side=st.sampled_from([2, 4, 6, 8]), patch=st.sampled_from([1, 2]),
       B=st.integers(1, 3), regions=st.integers(1, 4), train=st.booleans(), data=st.data())
def test_converted_block_fuzz(kind, heads, head_dim, layers, side, patch, B, regions, train,
                              data):
    if side % patch:
        patch = 1
    seed = data.draw(st.integers(0, 10_000))
    ratios = data.draw(st.lists(st.floats(0.1, 1.0), min_size=regions, max_size=regions))
    ts = data.draw(st.lists(st.integers(0, 999), min_size=B, max_size=B))
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, 4, side, side, generator=g),
              timestep=torch.tensor(ts))
    if kind == "pixart":
        kw["encoder_hidden_states"] = torch.randn(B, 3, 12, generator=g)
        mask = torch.ones(B, 3, dtype=torch.long)
        mask[:, 2] = torch.randint(0, 2, (B,), generator=g)
        kw["encoder_attention_mask"] = mask
    else:
        kw["class_labels"] = torch.randint(0, 5, (B,), generator=g)
    before = {k: v.clone() for k, v in kw.items()}
    outs = {}
    for path in ("compat", "fused"):
        m = _model(kind, heads, head_dim, layers, side, patch, seed)
        diffcr.convert(m, DiffCRConfig(num_regions=regions, path=path, gate="sigmoid"))
        gw = torch.Generator().manual_seed(seed + 1)  # same routers for both paths
        with torch.no_grad():
            for b in diffcr.routed_blocks(m).values():
                b.ratio.kept.copy_(torch.tensor(ratios))
                b.router.weight.normal_(0, 0.5, generator=gw)
        m.train(train)
        with torch.no_grad():
            torch.manual_seed(1)
            first = m(**kw).sample
            torch.manual_seed(1)
            again = m(**kw).sample
        assert torch.isfinite(first).all()
        assert torch.equal(first, again), "repeated call differs"
        outs[path] = first
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"input {k} was modified"
    scale = max(1.0, outs["compat"].abs().max().item())
    torch.testing.assert_close(outs["fused"], outs["compat"], rtol=1e-4, atol=1e-4 * scale)
