"""DiT (``DiTTransformer2DModel``): ``BasicTransformerBlock`` with ``ada_norm_zero`` (class
label + timestep embedding inside each block); DDPM timesteps ``t`` in ``[0, T)``, noise level
``t / T``."""
from contextlib import contextmanager

from ._basic_block import BasicBlockFamily
from .registry import register_family


@register_family
class DiTFamily(BasicBlockFamily):
    name = "dit"
    model_classes = ("DiTTransformer2DModel",)
    block_lists = ("transformer_blocks",)

    @contextmanager
    def call_context(self, block, call):
        """DiT blocks drop class labels at random in train mode (classifier-free guidance),
        inside each block. A routed block may call the diffusers forward more than once (one
        call per group of equal-k segments, two bins per sample), which would draw a different
        drop for each call. Draw it once here, exactly as the dense block would, and switch the
        label embedding's dropout off for the calls."""
        labels = call.get("class_labels")
        ce = getattr(getattr(block.norm1, "emb", None), "class_embedder", None)
        if (block.norm_type != "ada_norm_zero" or labels is None or ce is None
                or not ce.training or not getattr(ce, "dropout_prob", 0) > 0):
            yield
            return
        call["class_labels"] = ce.token_drop(labels)
        ce.train(False)
        try:
            yield
        finally:
            ce.train(True)
