"""Measurements shared by ``pytest benchmarks/`` and ``diffcr bench``: dense vs routed blocks,
the routing overhead, and the two-bin training step, each against a baseline measured in the
same run, with the ideal speedup of method §6.

Sizes are real, with random weights, built on the target device; nothing is downloaded:
PixArt-Sigma-XL block (D = 1152, 16 heads x 72, 120 text tokens), DiT-XL/2 (D = 1152, no
cross-attention), SD3.5-Large joint block (D = 2432, 38 x 64, 333 text tokens), Flux.1
double-stream and single-stream blocks (D = 3072, 24 x 128, 512 text tokens), Wan 2.1 1.3B
block (D = 1536, 12 x 128, FFN 8960, 512 text tokens), Qwen-Image and HunyuanVideo
double-stream blocks (D = 3072, 24 x 128, 256 text tokens); the table of kinds is
:mod:`diffcr.app.bench_kinds`. Each row records the path the routed block took in its last
call (``path``, :attr:`diffcr.routing.BlockRouting.last_path`): ``"fused"`` for PixArt, DiT,
SD3, Flux and Wan, ``"compat"`` (the block's own diffusers forward on the gathered tokens) for
Qwen-Image and HunyuanVideo, ``"dense"`` at kappa = 1 (every token kept).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import diffcr_kernels as dk

from ..config import DiffCRConfig
from ..convert import convert, freeze, routed_blocks, set_timestep
from ..routing import routing_state
from .bench_kinds import DESCRIPTIONS, JOINT_KINDS, KINDS, VIDEO_KINDS

__all__ = ["ideal_block_flops", "ideal_speedup", "BlockBench", "make_block_bench", "time_fn",
           "time_pairs", "bench_blocks", "bench_masked", "bench_overhead", "bench_training",
           "video_shape",
           "KINDS", "JOINT_KINDS", "VIDEO_KINDS", "DESCRIPTIONS"]

XL = dict(num_attention_heads=16, attention_head_dim=72)
DEMO_DIT = dict(num_attention_heads=4, attention_head_dim=32)  # app/demo/dense_dit
TEXT_TOKENS = 120


def ideal_block_flops(n: float, d: int, text: int) -> float:
    """FLOPs of a PixArt/DiT block with n image tokens (method §6): N (24 D^2 + 4 D^2 + 4 L D)
    + 4 N^2 D + 4 L D^2 with L > 0 text tokens (the cross-attention's Q and O projections are
    the second term; the text K/V projection is fixed), N · 24 D^2 + 4 N^2 D without text."""
    cross_qo = 4 * d * d if text else 0
    return n * (24 * d * d + cross_qo + 4 * text * d) + 4 * n * n * d + 4 * text * d * d


def ideal_speedup(kappa: float, n: int, d: int, text: int, two_bin: Optional[tuple] = None,
                  nested_attention: bool = False) -> float:
    """Dense cost over routed cost at kept ratio kappa (linear parts x kappa, attention x
    kappa^2). ``two_bin=(ka, kb)``: the training step (forward and backward) runs both
    branches; what they share is counted once (method §6): the text K/V projection, and the
    Q/K/V projections of the smaller bin's tokens, which are also the larger bin's; with
    ``nested_attention`` (where the nested bins' attention runs, :func:`nested_attention_runs`)
    also the smaller bin's self-attention forward (:func:`training_ideal`)."""
    dense = ideal_block_flops(n, d, text)
    if two_bin is None:
        return dense / ideal_block_flops(kappa * n, d, text)
    ka, kb = two_bin
    both = ideal_block_flops(ka * n, d, text) + ideal_block_flops(kb * n, d, text) \
        - 4 * text * d * d - 6 * d * d * min(ka, kb) * n
    shared_attn = 4 * (min(ka, kb) * n) ** 2 * d if nested_attention else 0.0
    return training_ideal(dense, both, shared_attn)


def training_ideal(dense: float, both: float, shared_attn: float = 0.0) -> float:
    """Dense over routed cost of a training step (method §6), from forward FLOPs: ``dense``
    of the dense block, ``both`` of the two bins with their shared projections once, and
    ``shared_attn`` of the smaller bin's self-attention forward, which the nested bins'
    attention computes inside the larger bin's (0 where it does not run). A backward costs
    twice its forward (model FLOPs); the attention's backward is not shared:
    ``3 dense / (3 both - shared_attn)``."""
    return 3 * dense / (3 * both - shared_attn)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable, device, rounds: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _peak_mem(fn, device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


@dataclass
class BlockBench:
    """A dense block and a converted copy of it (same weights) with their inputs."""

    kind: str
    model: torch.nn.Module      # the model holding the benchmarked block, converted
    dense: torch.nn.Module      # the unconverted block
    inputs: Dict[str, torch.Tensor]
    N: int
    D: int
    text: int
    #: FLOPs of the block with n routed tokens (None: method §6's PixArt/DiT formula)
    cost: Optional[Callable[[float], float]] = None
    #: the FLOPs the two bins of a training pass share (counted once), given the smaller
    #: bin's token count
    shared_cost: Optional[Callable[[float], float]] = None
    #: the forward FLOPs of the smaller bin's self-attention given the two bins' token counts,
    #: where the training pass computes it inside the larger bin's (the nested bins'
    #: attention: CPU, no text key mask, enough rows; else 0); None where it never does
    nested_attn: Optional[Callable[[float, float], float]] = None

    @property
    def block(self):
        return next(iter(routed_blocks(self.model).values()))

    def path(self) -> Optional[str]:
        """The path the routed block took in its last call (``"fused"``, ``"compat"``, or
        ``"dense"`` when it kept every token: :attr:`diffcr.routing.BlockRouting.last_path`;
        None before its first call)."""
        return next(iter(routing_state(self.model).blocks.values())).last_path

    def flops(self, n: float) -> float:
        return self.cost(n) if self.cost is not None else ideal_block_flops(n, self.D, self.text)

    def ideal(self, kappa: float, two_bin: Optional[tuple] = None) -> float:
        """Dense cost over routed cost; two_bin: of a training step, both branches with the
        shared part once (:func:`training_ideal`)."""
        if two_bin is None:
            if self.cost is None:
                return ideal_speedup(kappa, self.N, self.D, self.text)
            return self.flops(self.N) / self.flops(kappa * self.N)
        ka, kb = two_bin
        shared_attn = self._nested_flops(ka, kb)
        return training_ideal(self.flops(self.N), self.two_bin_forward_flops(ka, kb)
                              + shared_attn, shared_attn)

    def _nested_flops(self, ka: float, kb: float) -> float:
        if self.nested_attn is None:
            return 0.0
        return self.nested_attn(min(ka, kb) * self.N, max(ka, kb) * self.N)

    def two_bin_forward_flops(self, ka: float, kb: float) -> float:
        """Forward FLOPs of the fused two-bin training pass at bins ``(ka, kb)``: both bins,
        less what they share (the shared projections; with :attr:`nested_attn` the smaller
        bin's self-attention forward)."""
        n_a = min(ka, kb) * self.N
        if self.cost is None:
            D, L = self.D, self.text
            shared = 4 * L * D * D + 6 * D * D * n_a
        else:
            shared = self.shared_cost(n_a)
        return self.flops(ka * self.N) + self.flops(kb * self.N) - shared \
            - self._nested_flops(ka, kb)

    @staticmethod
    def loss_of(out) -> torch.Tensor:
        """A scalar of a block output (image and, for joint blocks, text stream)."""
        parts = out if isinstance(out, tuple) else (out,)
        return sum(p.float().square().mean() for p in parts if p is not None)

    def set_kappa(self, kappa: float) -> None:
        from ..convert import unfreeze

        unfreeze(self.model)
        with torch.no_grad():
            for b in routed_blocks(self.model).values():
                b.ratio.kept.fill_(kappa)
        freeze(self.model)

    def run_dense(self):
        return self.dense(**self.inputs)

    def run_routed(self):
        return self.block(**self.inputs)


def make_block_bench(kind: str = "pixart", N: int = 1024, B: int = 1, device="cpu",
                     dtype=torch.float32, seed: int = 0) -> BlockBench:
    """A one-block PixArt-Sigma-XL, DiT-XL/2 or demo DiT model with N image tokens, batch
    B."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    if kind in JOINT_KINDS:
        return _make_joint_bench(kind, N, B, torch.device(device), dtype, seed)
    device = torch.device(device)
    side = int(round(N ** 0.5))
    if side * side != N:
        raise ValueError(f"N must be a square number of tokens, got {N}")
    torch.manual_seed(seed)
    with torch.device(device):
        if kind == "pixart":
            model = PixArtTransformer2DModel(**XL, in_channels=4, out_channels=8, num_layers=1,
                                             sample_size=2 * side, patch_size=2,
                                             cross_attention_dim=1152, caption_channels=4096,
                                             norm_type="ada_norm_single",
                                             use_additional_conditions=False)
        elif kind == "dit":
            model = DiTTransformer2DModel(**XL, in_channels=4, out_channels=8, num_layers=1,
                                          sample_size=2 * side, patch_size=2,
                                          num_embeds_ada_norm=1000)
        elif kind == "dit-demo":  # the block of the demo's model (app/demo/dense_dit)
            model = DiTTransformer2DModel(**DEMO_DIT, in_channels=3, out_channels=3,
                                          num_layers=1, sample_size=2 * side, patch_size=2,
                                          num_embeds_ada_norm=6)
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dtype != torch.float32:
        model = model.to(dtype)
    model = model.eval().requires_grad_(False)
    blk = model.transformer_blocks[0]
    with torch.no_grad():  # diffusers zero-inits some gates; give every weight a real value
        for p in blk.parameters():
            if p.dim() >= 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    D = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, device=device, dtype=dtype)
    if kind == "pixart":
        inputs = dict(hidden_states=x,
                      encoder_hidden_states=torch.randn(B, TEXT_TOKENS, D, generator=g,
                                                        device=device, dtype=dtype),
                      timestep=0.1 * torch.randn(B, 6 * D, generator=g, device=device,
                                                 dtype=dtype))
        text = TEXT_TOKENS
    else:
        inputs = dict(hidden_states=x, timestep=torch.randint(0, 1000, (B,), device=device),
                      class_labels=torch.randint(0, model.config.num_embeds_ada_norm, (B,),
                                                 device=device))
        text = 0
    dense = copy.deepcopy(blk)
    convert(model, DiffCRConfig(num_regions=1, param_dtype="float32"))
    set_timestep(model, [500.0] * B)
    return BlockBench(kind, model, dense, inputs, N, D, text,
                      nested_attn=_nested_self_attn(D, 0, device))


# real block sizes of the families after PixArt and DiT (random weights, nothing downloaded)
SD35_LARGE = dict(D=2432, heads=38, head_dim=64, text=333)
FLUX1 = dict(D=3072, heads=24, head_dim=128, text=512)
WAN_1_3B = dict(D=1536, heads=12, head_dim=128, text=512, ffn=8960)
WAN_14B = dict(D=5120, heads=40, head_dim=128, text=512, ffn=13824)
QWEN_IMAGE = dict(D=3072, heads=24, head_dim=128, text=256)
HUNYUAN_VIDEO = dict(D=3072, heads=24, head_dim=128, text=256)


def nested_attention_runs(device, n_a: float, n_b: float, text: int = 0) -> bool:
    """Whether the fused training pass computes the smaller bin's attention inside the larger
    bin's (:func:`diffcr_kernels.nested_attention`): on CPU, when the two bins' rows (each
    with its ``text`` rows in a joint block) reach ``NESTED_MIN_ROWS``."""
    from diffcr_kernels.attention import NESTED_MIN_ROWS

    return torch.device(device).type == "cpu" and \
        round(n_a) + round(n_b) + 2 * text >= NESTED_MIN_ROWS


def _nested_self_attn(D, L, device):
    """Forward FLOPs of the smaller bin's self-attention over its n_a rows and L text rows,
    where the nested bins' attention shares it (:func:`nested_attention_runs`; on a GPU both
    bins run in one varlen call: None)."""
    if torch.device(device).type != "cpu":
        return None
    return lambda n_a, n_b: 4 * (n_a + L) ** 2 * D if nested_attention_runs(
        device, n_a, n_b, L) else 0.0


def _joint_cost(D, L):
    """MMDiT block (SD3 joint block, Flux double block): 24 D^2 per token of either stream
    (q, k, v, out and a 4x MLP), the text stream fixed, joint attention over [text; image].
    Shared by the two bins of a training pass (``shared(n_a)``, n_a the smaller bin's tokens,
    all of them also the larger bin's): the text q/k/v projections (6 D^2 L) and the image
    q/k/v projections of the n_a tokens; the text stream after attention depends on the kept
    image tokens, so each bin pays for it."""
    def cost(n):
        return 24 * D * D * (n + L) + 4 * (n + L) ** 2 * D
    return cost, lambda n_a: 6 * D * D * (L + n_a)


def _flux_single_cost(D, L):
    """Flux single-stream block: per token of [text; image] q, k, v (3 D^2), the MLP input
    projection (4 D^2) and the fused output projection (5 D^2): 24 D^2 flops, attention over
    [text; image]. Shared by two bins: of the text rows and of the smaller bin's tokens (all
    of them also the larger bin's), the q/k/v and MLP input projections (14 D^2) and the MLP
    half of the output projection (8 D^2), which sees only the token's own MLP activations;
    the attention half sees the attention output, which depends on the bin."""
    def cost(n):
        return 24 * D * D * (n + L) + 4 * (n + L) ** 2 * D
    return cost, lambda n_a: 22 * D * D * (L + n_a)


def _wan_cost(D, L, F):
    """Wan block: per video token self-attention projections (4 D^2), cross-attention q and
    out (2 D^2), FFN (2 D F); the text K/V projections are fixed; self-attention over the
    kept tokens, cross-attention of each kept token over the text. Shared by two bins: the text
    K/V projections and the self-attention q/k/v projections (6 D^2) of the smaller bin's
    tokens (all of them also the larger bin's)."""
    def cost(n):
        return 2 * n * (6 * D * D + 2 * D * F) + 4 * L * D * D + 4 * n * n * D + 4 * n * L * D
    return cost, lambda n_a: 4 * L * D * D + 6 * D * D * n_a


#: tokens per latent frame of a 480 x 832 video with 16-pixel tokens (VAE 8x, patch 2):
#: Wan 2.1 480p, 81 frames = 21 latent frames = 32,760 tokens
WAN_480P_FRAME = (30, 52)


def video_shape(N: int):
    """``(frames, height, width)`` in tokens of N video tokens: 4 latent frames of a square,
    or else whole 480p frames (:data:`WAN_480P_FRAME`)."""
    side = int(round((N / 4) ** 0.5))
    if 4 * side * side == N:
        return 4, side, side
    h, w = WAN_480P_FRAME
    if N % (h * w) == 0:
        return N // (h * w), h, w
    raise ValueError(f"video N must be 4 frames of a square or a multiple of {h * w} "
                     f"(480p frames), got {N}")


def _square_side(N: int) -> int:
    side = int(round(N ** 0.5))
    if side * side != N:
        raise ValueError(f"N must be a square number of tokens, got {N}")
    return side


def _make_joint_bench(kind, N, B, device, dtype, seed) -> BlockBench:
    """One real-size block of SD3.5-Large, Flux.1 (double-stream) or Wan 2.1 1.3B with N image
    (video) tokens, batch B, and its per-call inputs (text stream, temb, rotary)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel

    torch.manual_seed(seed)
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, device=device, dtype=dtype)

    with torch.device(device):
        if kind == "sd3":
            c = SD35_LARGE
            side = _square_side(N)
            # two blocks: the last one is context_pre_only, the first is the common kind
            model = SD3Transformer2DModel(
                sample_size=2 * side, patch_size=2, in_channels=16, num_layers=2,
                attention_head_dim=c["head_dim"], num_attention_heads=c["heads"],
                joint_attention_dim=c["D"], caption_projection_dim=c["D"],
                pooled_projection_dim=64, out_channels=16, pos_embed_max_size=2 * side)
            D, L = c["D"], c["text"]
            inputs = dict(hidden_states=rnd(B, N, D), encoder_hidden_states=rnd(B, L, D),
                          temb=rnd(B, D, scale=0.1))
            cost, shared = _joint_cost(D, L)
            blocks_attr, routed = "transformer_blocks", 0
        elif kind in ("flux", "flux-single"):
            c = FLUX1
            side = _square_side(N)
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                attention_head_dim=c["head_dim"], num_attention_heads=c["heads"],
                joint_attention_dim=64, pooled_projection_dim=64,
                axes_dims_rope=(16, 56, 56))
            D, L = c["D"], c["text"]
            img = torch.zeros(N, 3)
            img[:, 1] = torch.arange(N) // side
            img[:, 2] = torch.arange(N) % side
            rope = model.pos_embed(torch.cat([torch.zeros(L, 3), img]))
            inputs = dict(hidden_states=rnd(B, N, D), encoder_hidden_states=rnd(B, L, D),
                          temb=rnd(B, D, scale=0.1),
                          image_rotary_emb=rope)  # as the model makes it (float32)
            if kind == "flux":
                cost, shared = _joint_cost(D, L)
                blocks_attr, routed = "transformer_blocks", 0
            else:  # the routed-block numbering runs through both lists, double blocks first
                cost, shared = _flux_single_cost(D, L)
                blocks_attr, routed = "single_transformer_blocks", 1
        elif kind == "qwenimage":
            from diffusers import QwenImageTransformer2DModel

            c = QWEN_IMAGE
            side = _square_side(N)
            model = QwenImageTransformer2DModel(
                patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                attention_head_dim=c["head_dim"], num_attention_heads=c["heads"],
                joint_attention_dim=64, axes_dims_rope=(16, 56, 56))
            D, L = c["D"], c["text"]
            try:  # diffusers >= 0.36: (shapes, device, max_txt_seq_len)
                rope = model.pos_embed([(1, side, side)], device=device, max_txt_seq_len=L)
            except TypeError:  # 0.35: (shapes, txt_seq_lens, device)
                rope = model.pos_embed([(1, side, side)], [L], device=device)
            inputs = dict(hidden_states=rnd(B, N, D), encoder_hidden_states=rnd(B, L, D),
                          encoder_hidden_states_mask=None, temb=rnd(B, D, scale=0.1),
                          image_rotary_emb=rope)
            cost, shared = _joint_cost(D, L)
            blocks_attr, routed = "transformer_blocks", 0
        elif kind == "hunyuanvideo":
            from diffusers import HunyuanVideoTransformer3DModel

            c = HUNYUAN_VIDEO
            frames, th, tw = video_shape(N)
            model = HunyuanVideoTransformer3DModel(
                in_channels=16, out_channels=16, num_attention_heads=c["heads"],
                attention_head_dim=c["head_dim"], num_layers=1, num_single_layers=0,
                num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=64)
            D, L = c["D"], c["text"]
            rope = model.rope(torch.zeros(1, 16, frames, 2 * th, 2 * tw))
            # the joint key mask [B, 1, 1, N + L] the model always passes (every text token
            # valid here): dense and routed blocks both run masked attention, as in a pipeline
            mask = torch.ones(B, 1, 1, N + L, dtype=torch.bool)
            inputs = dict(hidden_states=rnd(B, N, D), encoder_hidden_states=rnd(B, L, D),
                          temb=rnd(B, D, scale=0.1), attention_mask=mask, freqs_cis=rope)
            cost, shared = _joint_cost(D, L)
            blocks_attr, routed = "transformer_blocks", 0
        elif kind in ("wan", "wan-14b"):
            c = WAN_1_3B if kind == "wan" else WAN_14B
            frames, th, tw = video_shape(N)
            model = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=c["heads"],
                attention_head_dim=c["head_dim"], in_channels=16, out_channels=16,
                text_dim=64, freq_dim=256, ffn_dim=c["ffn"], num_layers=1, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
            D, L = c["D"], c["text"]
            rope = model.rope(torch.zeros(B, 16, frames, 2 * th, 2 * tw))
            inputs = dict(hidden_states=rnd(B, N, D), encoder_hidden_states=rnd(B, L, D),
                          temb=rnd(B, 6, D, scale=0.1),
                          rotary_emb=rope)
            cost, shared = _wan_cost(D, L, c["ffn"])
            blocks_attr, routed = "blocks", 0
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dtype != torch.float32:
        model = model.to(dtype)
    model = model.eval().requires_grad_(False)
    blk = getattr(model, blocks_attr)[0]
    with torch.no_grad():  # diffusers zero-inits some gates; give every weight a real value
        for p in blk.parameters():
            if p.dim() >= 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    dense = copy.deepcopy(blk)
    convert(model, DiffCRConfig(num_regions=1, param_dtype="float32", routed_blocks=[routed]))
    set_timestep(model, [0.5 if kind in ("flux", "flux-single", "qwenimage") else 500.0] * B)
    # HunyuanVideo passes a text key mask: its bins' joint attention runs separately
    nested = None if kind == "hunyuanvideo" else _nested_self_attn(
        D, 0 if kind in ("wan", "wan-14b") else L, device)
    return BlockBench(kind, model, dense, inputs, N, D, L, cost=cost, shared_cost=shared,
                      nested_attn=nested)


def time_pairs(fns: Dict[str, Callable], device, rounds: int = 5, warmup: int = 1
               ) -> Dict[str, List[float]]:
    """Seconds of each ``fn`` per round, the functions run one after another in every round
    (interleaved), so a slow phase of a shared machine hits all of them alike; ratios are then
    taken within a round. The order rotates from round to round: whatever runs right after a
    large dense block pays for its freed memory (page faults, cold caches), measured at 1-2 ms
    on the CPU block, and rotating spreads that over all of them."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    _sync(device)
    names = list(fns)
    out: Dict[str, List[float]] = {n: [] for n in fns}
    for r in range(rounds):
        s = r % len(names)
        for n in names[s:] + names[:s]:
            f = fns[n]
            t0 = time.perf_counter()
            f()
            _sync(device)
            out[n].append(time.perf_counter() - t0)
    return out


def _naive_fn(bb: BlockBench, k: int):
    """The plain-torch control of the issue: gather k rows, run the unconverted diffusers block
    on them, write them back into a copy of x (no router, no gating)."""
    x = bb.inputs["hidden_states"]
    B, N, _ = x.shape
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(N, generator=g)[:k].sort().values.to(x.device)
    rest = {n: v for n, v in bb.inputs.items() if n != "hidden_states"}

    def naive():
        o = bb.dense(x.index_select(1, idx), **rest)
        return x.clone().index_copy_(1, idx, o)
    return naive


def _resolve_prepack(prepack: Optional[bool], device) -> bool:
    from ..cpu import prepack_available

    if prepack is None:
        return device.type == "cpu" and prepack_available()
    if prepack and (device.type != "cpu" or not prepack_available()):
        raise ValueError("prepack=True needs a CPU device and a torch build with MKL")
    return bool(prepack)


def _token_cache_fn(bb: "BlockBench"):
    """The routed block of ``bb`` with the token cache on, in its steady state: the cache
    filled by one refresh call, then every call a routed step whose skipped rows get the
    forecast (:mod:`diffcr.token_cache`)."""
    import diffcr

    tc = diffcr.enable_token_cache(bb.model, diffcr.TokenCacheConfig())
    bb.run_routed()  # step 0: the refresh fills every row's update
    tc.step = 1  # the block is called directly (no model forward advances the step)

    def cached():
        return bb.run_routed()
    return cached


def bench_blocks(kind="pixart", N=1024, B=1, kappas=(1.0, 0.8, 0.5, 0.3), device="cpu",
                 dtype=torch.float32, rounds=3, prepack: Optional[bool] = None,
                 naive: bool = True, token_cache: bool = False,
                 bench: Optional[BlockBench] = None, compile: bool = False) -> List[dict]:
    """Dense vs routed (frozen, fused path) block at each kappa: time, speedup, ideal,
    fraction of ideal, peak memory.

    ``bench``: a :func:`make_block_bench` result for the same ``kind``, ``N``, ``B``, device
    and dtype, to time instead of building a new one (real-size blocks take seconds to
    initialise on a CPU).

    ``token_cache``: also the routed block with the token cache (order 0, steady state: the
    skipped rows get their cached update), interleaved with the others at kappa < 1:
    ``token_cache_ms``, its speedup over dense and fraction of the routed ideal, its time over
    the plain routed block's, and the bytes its one pass moves (``token_cache_bytes_moved``,
    :func:`diffcr_kernels.apply_token_cache_`: per skipped row, read its output and cache
    entry and write the output; per selected row, read its output and input and write its
    cache entry: ``3 N D`` values per sample, plus ``2 k D`` for gathering the selected
    rows' inputs before the block runs).

    For every kappa the dense block, the routed block and (``naive``) the plain-torch control
    gather -> diffusers block -> scatter run interleaved for ``rounds`` rounds; the fraction of
    ideal is the median over rounds of (dense / routed) / ideal. ``prepack`` (default: on for
    CPU when MKL is there) gives the dense, routed and naive blocks alike MKL-prepacked
    weights (:mod:`diffcr.cpu`); the rows record it.

    ``compile``: the dense and the routed block each compiled with
    ``torch.compile(fullgraph=True)``, as diffusers' regional compile
    (``compile_repeated_blocks``) compiles every block (one graph per kept ratio, compiled in
    the warm-up round); no prepacking then, and no naive control.
    """
    dev = torch.device(device)
    packed = _resolve_prepack(prepack, dev) and not compile
    bb = bench if bench is not None else make_block_bench(kind, N, B, device, dtype)
    naive = naive and kind not in JOINT_KINDS and not compile  # the PixArt/DiT block's control
    if packed:
        from ..cpu import prepack_linears

        prepack_linears(bb.dense)
        prepack_linears(bb.block)
    if compile:
        bb.dense.compile(fullgraph=True)
        bb.block.compile(fullgraph=True)
    rows = []
    with torch.no_grad():
        m_dense = _peak_mem(bb.run_dense, dev)
        for kappa in kappas:
            bb.set_kappa(kappa)
            k = dk.kept_count(kappa, N)
            fns = {"dense": bb.run_dense, "routed": bb.run_routed}
            if naive:
                fns["naive"] = _naive_fn(bb, k)
            cached = token_cache and k < N
            if cached:
                fns["token_cache"] = _token_cache_fn(bb)
            ts = time_pairs(fns, dev, rounds)
            if cached:
                import diffcr

                diffcr.disable_token_cache(bb.model)
            ideal = bb.ideal(k / N)
            med = {n: statistics.median(v) for n, v in ts.items()}
            speedup = statistics.median(d / r for d, r in zip(ts["dense"], ts["routed"]))
            row = dict(kind=kind, N=N, B=B, kappa=kappa, k=k, dense_ms=med["dense"] * 1e3,
                       routed_ms=med["routed"] * 1e3, speedup=speedup,
                       ideal_speedup=ideal, fraction_of_ideal=speedup / ideal,
                       peak_mem_MB=_peak_mem(bb.run_routed, dev), dense_peak_mem_MB=m_dense,
                       prepacked=packed, rounds=rounds, path=bb.path(), compiled=compile,
                       dense_rounds_ms=[t * 1e3 for t in ts["dense"]],
                       routed_rounds_ms=[t * 1e3 for t in ts["routed"]])
            if naive:
                row["naive_ms"] = med["naive"] * 1e3
                row["naive_fraction_of_ideal"] = statistics.median(
                    d / r for d, r in zip(ts["dense"], ts["naive"])) / ideal
                row["routed_vs_naive"] = statistics.median(
                    nv / r for nv, r in zip(ts["naive"], ts["routed"]))
            if cached:
                tc_speedup = statistics.median(
                    d / c for d, c in zip(ts["dense"], ts["token_cache"]))
                elt = torch.empty((), dtype=dtype).element_size()
                row.update(token_cache_ms=med["token_cache"] * 1e3,
                           token_cache_speedup=tc_speedup,
                           token_cache_fraction_of_ideal=tc_speedup / ideal,
                           token_cache_vs_routed=statistics.median(
                               c / r for c, r in zip(ts["token_cache"], ts["routed"])),
                           token_cache_bytes_moved=B * (3 * N + 2 * k) * bb.D * elt)
            rows.append(row)
    return rows


def box_mask(side: int, fraction: float) -> torch.Tensor:
    """``[side, side]`` bool: a centred square covering about ``fraction`` of the grid (at
    least one token), the inpainting region of :func:`bench_masked`."""
    s = max(1, min(side, round(side * fraction ** 0.5)))
    m = torch.zeros(side, side, dtype=torch.bool)
    o = (side - s) // 2
    m[o:o + s, o:o + s] = True
    return m


def bench_masked(kind="pixart", N=1024, B=1, fractions=(0.1, 0.25, 0.5), contexts=(0.3, 0.5),
                 device="cpu", dtype=torch.float32, rounds=3, prepack: Optional[bool] = None,
                 bench: Optional[BlockBench] = None) -> List[dict]:
    """Mask-aware routing (:func:`diffcr.mask_routing`): dense vs the routed block computing a
    centred box of ``fraction`` of the image tokens (:func:`box_mask`) plus ``context`` of the
    rest, for every (fraction, context) pair. ``k`` is what the block computes (the masked
    count rounded up to the bucket, plus the context's share), the ideal that of routing at
    ``k / N`` (method §6), the two timed interleaved for ``rounds`` rounds (median of
    dense/routed). Image kinds only (a video has no single image grid)."""
    import diffcr

    if kind in VIDEO_KINDS:
        raise ValueError(f"mask-aware routing is for images; {kind} is a video block")
    side = _square_side(N)
    dev = torch.device(device)
    packed = _resolve_prepack(prepack, dev)
    bb = bench if bench is not None else make_block_bench(kind, N, B, device, dtype)
    if packed:
        from ..cpu import prepack_linears

        prepack_linears(bb.dense)
        prepack_linears(bb.block)
    rows = []
    with torch.no_grad():
        for frac in fractions:
            mask = box_mask(side, frac)
            for ctx in contexts:
                bb.set_kappa(ctx)
                with diffcr.mask_routing(bb.model, mask, margin=0,
                                         context_kept_ratio=ctx):
                    keep = routing_state(bb.model).keep_mask
                    k = keep.plan([[N]], N, dev)[1][0][0]
                    ts = time_pairs({"dense": bb.run_dense, "routed": bb.run_routed}, dev,
                                    rounds)
                    path = bb.path()
                ideal = bb.ideal(k / N)
                speedup = statistics.median(d / r for d, r in zip(ts["dense"], ts["routed"]))
                rows.append(dict(kind=kind, N=N, B=B, mask_fraction=frac,
                                 masked=int(mask.sum()), context_kept_ratio=ctx, k=k,
                                 dense_ms=statistics.median(ts["dense"]) * 1e3,
                                 routed_ms=statistics.median(ts["routed"]) * 1e3,
                                 speedup=speedup, ideal_speedup=ideal,
                                 fraction_of_ideal=speedup / ideal, prepacked=packed,
                                 rounds=rounds, path=path))
    return rows


def bench_overhead(kind="pixart", N=1024, B=1, kappa=0.5, device="cpu", dtype=torch.float32,
                   rounds=5) -> dict:
    """Routing overhead: score + select + gather/norm/modulate + gated scatter-back, as a share
    of the dense block time (the memory-bound work routing adds around the block body)."""
    bb = make_block_bench(kind, N, B, device, dtype)
    dev = torch.device(device)
    blk = bb.block
    x = bb.inputs["hidden_states"]
    k = dk.kept_count(kappa, N)
    D = bb.D
    shift = torch.randn(B, D, device=dev, dtype=dtype)
    gate = torch.randn(B, D, device=dev, dtype=dtype)
    T = B * k
    attn_update = torch.randn(T, D, device=dev, dtype=dtype)
    mlp_out = torch.randn(T, D, device=dev, dtype=dtype)

    def routing():
        s = blk.router(x)
        sel = dk.select_topk(s, k)
        dk.gather_norm_modulate(x, sel.indices, shift, shift)
        dk.gather_rows(x, sel.indices)
        dk.scatter_back_selection(x, sel, attn_update, mlp_out, gate)

    with torch.no_grad():
        ts = time_pairs({"dense": bb.run_dense, "routing": routing}, dev, rounds)
    t_dense = statistics.median(ts["dense"])
    t_route = statistics.median(ts["routing"])
    share = statistics.median(r / d for d, r in zip(ts["dense"], ts["routing"]))
    return dict(kind=kind, N=N, B=B, kappa=kappa, dense_ms=t_dense * 1e3,
                routing_ms=t_route * 1e3, overhead_fraction=share)


def bench_weight_casts(kind="pixart", device="cpu", low=torch.bfloat16, rounds=3) -> dict:
    """What ``torch.autocast`` pays at every call of a block with fp32 weights that need no
    gradient (inference): casting each linear weight to ``low`` (autocast caches casts only
    of weights that require grad). The dense and the routed block pay it alike and the flop
    ideal does not count it, so under autocast it is a fixed cost of every routed call.
    Returns ``weights`` (count) and ``cast_ms`` (median over ``rounds``)."""
    bb = make_block_bench(kind, 16, 1, device, torch.float32)
    casts = _weight_casts_fn(bb.dense, low)  # its weights need no grad: the forward casts
    ts = time_pairs({"cast": casts}, torch.device(device), rounds)["cast"]
    return dict(kind=kind, weights=sum(w.numel() for w in casts.weights), dtype=str(low),
                cast_ms=statistics.median(ts) * 1e3)


def bench_training(kind="pixart", N=1024, B=1, kappa=0.55, device="cpu", dtype=torch.float32,
                   rounds=3, lora_rank: int = 0, autocast: Optional[torch.dtype] = None
                   ) -> dict:
    """One training step of a block (forward + backward): dense vs DiffCR two-bin (both
    branches in one packed pass), with the ideal for the two branches together.
    ``lora_rank`` > 0: the paper's recipe, peft LoRA of that rank on the block's attention and
    feed-forward layers of both (base weights frozen; LoRA, router and ratio trained).

    Each step is what a training loop does: gradients set to None
    (``zero_grad(set_to_none=True)``), the forward under its own ``torch.autocast(autocast)``
    region when ``autocast`` is given (as accelerate's ``--mixed-precision`` wraps every
    forward; autocast's cache of weight casts is cleared when the region closes), the loss
    and the backward outside it. Under autocast the weights' casts (each linear weight to
    ``autocast`` in the forward, the gradient of a trained one back to its dtype) do not
    depend on the tokens: they are timed on their own in the same rounds (``casts_ms``) and
    ``fraction_of_ideal_casts_fixed`` counts them as a fixed cost of both blocks (method §6)."""
    bb = make_block_bench(kind, N, B, device, dtype)
    dev = torch.device(device)
    from ..convert import unfreeze

    unfreeze(bb.model)
    for b in routed_blocks(bb.model).values():
        with torch.no_grad():
            b.ratio.kept.fill_(kappa)
    bb.model.train()
    bb.dense.train()
    if lora_rank:
        _lora_pair(bb, lora_rank)
    else:
        for p in list(bb.block.parameters()) + list(bb.dense.parameters()):
            p.requires_grad_(True)
    x = bb.inputs["hidden_states"].clone().requires_grad_()
    inputs = dict(bb.inputs, hidden_states=x)

    def step(mod):
        params = [p for p in mod.parameters() if p.requires_grad]

        def f():
            torch.manual_seed(0)
            for p in params + [x]:
                p.grad = None
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                out = mod(**inputs)
            BlockBench.loss_of(out).backward()
        return f

    fns = {"dense": step(bb.dense), "routed": step(bb.block)}
    if autocast is not None:
        fns["casts"] = _weight_casts_fn(bb.dense, autocast)
    ts = time_pairs(fns, dev, rounds)
    t_dense = statistics.median(ts["dense"])
    t_route = statistics.median(ts["routed"])
    speedup = statistics.median(d / r for d, r in zip(ts["dense"], ts["routed"]))
    plan = bb.block.ratio.two_bin([0], N)
    ka, kb = (v / N for v in plan.k[0])
    ideal = bb.ideal(kappa, two_bin=(ka, kb))
    out = dict(kind=kind, N=N, B=B, kappa=kappa, bins=(ka, kb), dense_ms=t_dense * 1e3,
               routed_ms=t_route * 1e3, speedup=speedup, ideal_speedup=ideal,
               fraction_of_ideal=speedup / ideal, lora_rank=lora_rank, path=bb.path(),
               autocast=None if autocast is None else str(autocast),
               dense_rounds_ms=[t * 1e3 for t in ts["dense"]],
               routed_rounds_ms=[t * 1e3 for t in ts["routed"]])
    if autocast is not None:
        out["casts_ms"] = statistics.median(ts["casts"]) * 1e3
        out["casts_rounds_ms"] = [t * 1e3 for t in ts["casts"]]
        out["fraction_of_ideal_casts_fixed"] = statistics.median(
            (min(c, d) + (d - min(c, d)) / ideal) / r
            for d, r, c in zip(ts["dense"], ts["routed"], ts["casts"]))
    return out


def _weight_casts_fn(block: torch.nn.Module, low: torch.dtype) -> Callable:
    """What autocast's weight casts cost one call (inference) or one training step of
    ``block``, whatever its tokens: every linear weight cast to ``low`` once, as the dense
    block casts it (autocast caches the cast of a weight that requires grad for the rest of
    its region; a frozen weight is cast at each call, so a routed block that calls one twice
    pays the second cast as its own cost), and the gradient of each trained one cast back to
    its dtype (``ToCopyBackward``). The returned function's ``weights`` lists the weights."""
    ws = [m.weight for m in block.modules()
          if isinstance(m, torch.nn.Linear) and m.weight.dtype != low]

    def casts():
        with torch.no_grad():
            for w in ws:
                c = w.to(low)
                if w.requires_grad:
                    c.to(w.dtype)
    casts.weights = ws
    return casts


def _lora_pair(bb: BlockBench, rank: int) -> None:
    """The same peft LoRA (B initialised at random so both blocks compute with it) on the
    routed block's model (:func:`diffcr.add_lora`) and on the dense block."""
    import re

    import peft

    from ..lora import add_lora, lora_target_names

    names = lora_target_names(bb.model)
    prefix = next(n for n, b in bb.model.named_modules() if b is bb.block) + "."
    own = [n[len(prefix):] for n in names if n.startswith(prefix)]
    add_lora(bb.model, rank)
    cfg = peft.LoraConfig(r=rank, lora_alpha=float(rank), target_modules="(" + "|".join(
        re.escape(n) for n in own) + ")")
    peft.inject_adapter_in_model(cfg, bb.dense)
    g = torch.Generator().manual_seed(0)
    dense_params = dict(bb.dense.named_parameters())
    with torch.no_grad():
        for n, p in bb.block.named_parameters():
            if ".lora_" in n:
                p.copy_(0.01 * torch.randn(p.shape, generator=g).to(p))
                dense_params[n].copy_(p)
    for n, p in bb.dense.named_parameters():
        p.requires_grad_(".lora_" in n)
