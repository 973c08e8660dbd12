"""A tiny random PixArt pipeline folder (transformer, T5 text encoder, word-level tokenizer,
VAE, DDPM scheduler) and a captioned image folder, written to disk with no downloads: what
``diffcr train --model PIPELINE --data CAPTIONED`` reads."""
import json
from pathlib import Path

import torch

WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "the", "left", "right"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def write_pipeline(root, caption_channels=32, text_width=32):
    """The pipeline folder; ``text_width`` != ``caption_channels`` makes a mismatched one."""
    from diffusers import DDPMScheduler
    from transformers import T5Config, T5EncoderModel

    from tiny_models import _randomise_weights, tiny_pixart, tiny_vae

    root = Path(root)
    torch.manual_seed(0)
    model = _randomise_weights(tiny_pixart())
    if caption_channels != 32:
        raise ValueError("the tiny PixArt has caption_channels 32")
    model.save_pretrained(root / "transformer")
    T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=text_width, d_ff=64,
                            num_layers=1, num_heads=2, d_kv=16)).save_pretrained(
        root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    tiny_vae().save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.35.0",
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return root


def write_captioned_clips(root, n=4, frames=(5, 7), suffix=".gif", size=(40, 32)):
    """``n`` short clips (a square moving across a random background) of alternating lengths
    ``frames``, as animated GIFs (Pillow) or, with ``suffix=".mp4"``, through imageio's ffmpeg
    writer (``diffusers.utils.export_to_video``), and their metadata.jsonl."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    w, h = size
    lines = []
    for i in range(n):
        back = (torch.rand(h, w, 3, generator=g) * 128).to(torch.uint8)
        clip = []
        for f in range(frames[i % len(frames)]):
            px = back.clone()
            px[8:16, 4 + 3 * f:12 + 3 * f] = torch.tensor([255, 40 * i, 0], dtype=torch.uint8)
            clip.append(Image.fromarray(px.numpy()))
        name = f"clip{i}{suffix}"
        if suffix == ".gif":
            clip[0].save(root / name, save_all=True, append_images=clip[1:], duration=60,
                         loop=0)
        else:
            from diffusers.utils import export_to_video

            export_to_video(clip, str(root / name), fps=8)
        lines.append(json.dumps({"file_name": name,
                                 "text": f"a {WORDS[1 + i % 3]} {WORDS[4 + i % 2]}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_captioned_images(root, n=6, sizes=((8, 8), (12, 10))):
    """``n`` small images of alternating sizes (the loader resizes and center-crops) and their
    metadata.jsonl."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        px = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(root / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png",
                                 "text": f"a {WORDS[1 + i % 3]} {WORDS[4 + i % 2]}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_flux_pipeline(root, t5_width=32):
    """A tiny random Flux.1 pipeline folder: CLIP (pooled, 32) and T5 (32) text encoders with
    word-level tokenizers, a one-latent-channel VAE (packed 2x2 -> the transformer's 4),
    a flow-matching scheduler. ``t5_width`` != 32 makes a mismatched one."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tiny_models import make

    root = Path(root)
    torch.manual_seed(0)
    make("flux").save_pretrained(root / "transformer")
    V = len(WORDS) + 3
    CLIPTextModel(CLIPTextConfig(vocab_size=V, hidden_size=32, intermediate_size=37,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=77, projection_dim=32,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=0)).save_pretrained(
        root / "text_encoder")
    tok = tiny_tokenizer()
    tok.model_max_length = 77
    tok.save_pretrained(root / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=V, d_model=t5_width, d_ff=64, num_layers=1, num_heads=2,
                            d_kv=16)).save_pretrained(root / "text_encoder_2")
    tiny_tokenizer().save_pretrained(root / "tokenizer_2")
    _write_flow_parts(root, "FluxPipeline", "FluxTransformer2DModel", latent_channels=1,
                      shift_factor=0.1159, scaling_factor=0.3611,
                      encoders={"text_encoder": "CLIPTextModel",
                                "text_encoder_2": "T5EncoderModel"})
    return root


def _write_flow_parts(root, pipeline, transformer, latent_channels, shift_factor,
                      scaling_factor, encoders):
    """The VAE, flow-matching scheduler and model_index.json of a tiny flow-matching pipeline
    (``encoders``: folder -> transformers class; each has a word-level tokenizer)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                  layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8,
                  sample_size=8, shift_factor=shift_factor, scaling_factor=scaling_factor,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    index = {"_class_name": pipeline, "_diffusers_version": "0.35.0",
             "transformer": ["diffusers", transformer], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    for folder, cls in encoders.items():
        index[folder] = ["transformers", cls]
        index[folder.replace("text_encoder", "tokenizer")] = ["transformers",
                                                              "PreTrainedTokenizerFast"]
    (root / "model_index.json").write_text(json.dumps(index))


def write_sd3_pipeline(root):
    """A tiny random SD3.5-style pipeline folder: two CLIPs with projection (hidden 8, pooled
    4 + 4 = the transformer's 8), T5 (16 = joint_attention_dim), word-level tokenizers, a
    4-channel VAE, a flow-matching scheduler."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from tiny_models import make

    root = Path(root)
    torch.manual_seed(0)
    make("sd3").save_pretrained(root / "transformer")
    V = len(WORDS) + 3
    for i, name in enumerate(("text_encoder", "text_encoder_2")):
        torch.manual_seed(i)
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=4,
            bos_token_id=0, eos_token_id=1, pad_token_id=0)).save_pretrained(root / name)
        tok = tiny_tokenizer()
        tok.model_max_length = 77
        tok.save_pretrained(root / name.replace("text_encoder", "tokenizer"))
    T5EncoderModel(T5Config(vocab_size=V, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                            d_kv=8)).save_pretrained(root / "text_encoder_3")
    tiny_tokenizer().save_pretrained(root / "tokenizer_3")
    _write_flow_parts(root, "StableDiffusion3Pipeline", "SD3Transformer2DModel",
                      latent_channels=4, shift_factor=0.0609, scaling_factor=1.5305,
                      encoders={"text_encoder": "CLIPTextModelWithProjection",
                                "text_encoder_2": "CLIPTextModelWithProjection",
                                "text_encoder_3": "T5EncoderModel"})
    return root


def write_wan_pipeline(root, two_experts: bool = False):
    """A tiny random Wan 2.1-style pipeline folder: UMT5 (16 = the transformer's text_dim) with
    a word-level tokenizer, a 4-channel Wan VAE (8x downsampling), UniPC with a flow shift.
    ``two_experts``: Wan 2.2 A14B-style, a second transformer (other random weights) in
    ``transformer_2`` and ``boundary_ratio`` 0.875 (the A14B T2V value)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from tiny_models import make

    root = Path(root)
    torch.manual_seed(0)
    make("wan").save_pretrained(root / "transformer")
    if two_experts:  # make() draws the same weights twice: move the second expert's
        second, g = make("wan"), torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in second.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        second.save_pretrained(root / "transformer_2")
    UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS) + 3, d_model=16, d_ff=32, num_layers=1,
                                num_heads=2, d_kv=8)).save_pretrained(root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.1] * 4,
                     latents_std=[2.0] * 4).save_pretrained(root / "vae")
    UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction",
                            use_flow_sigmas=True).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.35.0",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": (["diffusers", "WanTransformer3DModel"] if two_experts
                          else [None, None]),
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        **({"boundary_ratio": 0.875} if two_experts else {})}))
    return root


def write_qwenimage_pipeline(root, text_width: int = 32):
    """A tiny random Qwen-Image pipeline folder: a Qwen2.5-VL (text width 32 = the
    transformer's joint_attention_dim; a one-layer vision tower it never uses) with a
    word-level tokenizer, a 4-channel Qwen-Image VAE (8x downsampling), the flow-matching
    scheduler with the pipeline's dynamic (resolution-dependent) shift."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tiny_models import make

    root = Path(root)
    torch.manual_seed(0)
    make("qwenimage").save_pretrained(root / "transformer")
    V = len(WORDS) + 3
    text = dict(vocab_size=V, hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}
                if text_width == 32 else {"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                  out_hidden_size=text_width, fullatt_block_indexes=[0], window_size=28)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **text,
                           image_token_id=V + 1, video_token_id=V + 2,
                           vision_start_token_id=V + 3)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1] * 4,
                           latents_std=[2.0] * 4).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192,
        time_shift_type="exponential").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImagePipeline", "_diffusers_version": "0.35.0",
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return root


def write_hunyuanvideo_pipeline(root):
    """A tiny random HunyuanVideo pipeline folder: a Llama (16 = the transformer's
    text_embed_dim; three layers, as the pipeline reads the third hidden state from the end)
    and a CLIP (8 = pooled_projection_dim) with word-level tokenizers, a 4-channel HunyuanVideo
    VAE (8x spatial, 4x temporal), the flow-matching scheduler with shift 7."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from tiny_models import make

    root = Path(root)
    torch.manual_seed(0)
    make("hunyuanvideo").save_pretrained(root / "transformer")
    V = len(WORDS) + 3
    LlamaModel(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                           eos_token_id=1)).save_pretrained(root / "text_encoder")
    tok = tiny_tokenizer()
    tok.model_max_length = 512
    tok.save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=V, hidden_size=8, intermediate_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=0)).save_pretrained(root / "text_encoder_2")
    tok = tiny_tokenizer()
    tok.model_max_length = 77
    tok.save_pretrained(root / "tokenizer_2")
    AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                              layers_per_block=1, norm_num_groups=4,
                              mid_block_add_attention=False).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "HunyuanVideoPipeline", "_diffusers_version": "0.35.0",
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "text_encoder": ["transformers", "LlamaModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return root
