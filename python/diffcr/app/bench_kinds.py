"""The block kinds of ``diffcr bench`` and ``pytest benchmarks/`` as plain data (no torch, so
that the command line can build its choices without importing it): :data:`KINDS`, the kinds
:mod:`diffcr.app.bench` can build, :data:`JOINT_KINDS` (the kinds after PixArt and DiT),
:data:`VIDEO_KINDS` (whose token count is video tokens) and :data:`DESCRIPTIONS` (what block
each kind is, at what size)."""

__all__ = ["KINDS", "JOINT_KINDS", "VIDEO_KINDS", "DESCRIPTIONS"]

JOINT_KINDS = ("sd3", "flux", "flux-single", "wan", "wan-14b", "qwenimage", "hunyuanvideo")
#: kinds whose N is video tokens (:func:`diffcr.app.bench.video_shape`; the rest: a square)
VIDEO_KINDS = ("wan", "wan-14b", "hunyuanvideo")
KINDS = ("pixart", "dit", "dit-demo") + JOINT_KINDS
DESCRIPTIONS = {"pixart": "PixArt-Sigma-XL block (D=1152, 16x72, 120 text tokens)",
                "dit": "DiT-XL/2 block (D=1152, 16x72)",
                "dit-demo": "the demo's DiT block (D=128, 4x32; diffcr train's model, 64 "
                            "tokens)",
                "sd3": "SD3.5-Large joint block (D=2432, 38x64, 333 text tokens)",
                "flux": "Flux.1 double-stream block (D=3072, 24x128, 512 text tokens)",
                "flux-single": "Flux.1 single-stream block (D=3072, 24x128, 512 text tokens)",
                "qwenimage": "Qwen-Image double-stream block (D=3072, 24x128, 256 text tokens)",
                "hunyuanvideo": "HunyuanVideo double-stream block (D=3072, 24x128, 256 text "
                                "tokens)",
                "wan": "Wan 2.1 1.3B block (D=1536, 12x128, FFN 8960, 512 text tokens)",
                "wan-14b": "Wan 2.1 14B block (D=5120, 40x128, FFN 13824, 512 text tokens)"}
