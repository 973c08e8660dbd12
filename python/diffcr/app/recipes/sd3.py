"""The captioned fine-tuning recipe of SD3 / SD3.5 pipelines."""
from __future__ import annotations


from ..options import TrainError
from .base import (FlowRecipe, check_vae_channels, check_width, native_pixels, read_json,
                   register)


@register
class SD3Recipe(FlowRecipe):
    """SD3 / SD3.5: the pipeline's own ``encode_prompt`` (two CLIPs with projection + T5:
    sequence embeddings and the pooled CLIP vectors), flow matching on the unpacked latents,
    timesteps ``sigma * 1000`` as the pipeline passes them."""
    model_class = "SD3Transformer2DModel"
    family = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
             "tokenizer_3", "vae", "scheduler")

    def check(self, folder, tconf):
        super().check(folder, tconf)
        t5 = read_json(folder / "text_encoder_3" / "config.json").get("d_model")
        check_width(folder, "T5 text encoder's width", t5, tconf, "joint_attention_dim")
        pooled = sum(read_json(folder / p / "config.json").get("projection_dim", 0)
                     for p in ("text_encoder", "text_encoder_2"))
        if pooled and pooled != tconf.get("pooled_projection_dim"):
            raise TrainError(f"--model {folder}: the CLIP text encoders' pooled widths add up to "
                             f"{pooled}, not the transformer's pooled_projection_dim "
                             f"({tconf.get('pooled_projection_dim')})")
        check_vae_channels(folder, tconf)

    def pixels(self, folder, tconf, requested):
        return int(requested or native_pixels(folder, tconf))

    def max_length(self, pixels, requested):
        return int(requested or 256)

    def _encode_batch(self, pipe, texts, dev, max_length):
        e, _, p, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=dev,
                                        do_classifier_free_guidance=False,
                                        max_sequence_length=max_length)
        return e, p

    def inputs(self, b, x_t, level):
        return dict(hidden_states=x_t, timestep=level * 1000,
                    encoder_hidden_states=b.cond["emb"].to(b.device),
                    pooled_projections=b.cond["pooled"].to(b.device))

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, max_sequence_length=int(max_length or 256))
