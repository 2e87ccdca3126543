"""Tiny random stand-ins for the real text-to-image parts, written as local folders (nothing is downloaded).

- a T5 encoder (transformers config, random weights) with a word-level tokenizer trained here (``tokenizers``);
- a PixArt pipeline folder: transformer/ (diffusers PixArtTransformer2DModel), vae/ (a tiny AutoencoderKL),
  text_encoder/ + tokenizer/ (the tiny T5), model_index.json: the layout of PixArt-Sigma's diffusers folder;
- a CLIP model (transformers config, random weights) with a processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a photo of cat dog red blue car tree on the two three small big house sky under".split())
T5_WIDTH = 32


def _word_tokenizer(specials: list[str], template: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in specials if s in template])
    named = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    if "<bos>" in specials:
        named["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def write_tiny_t5(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide T5 encoder and its tokenizer in one folder."""
    from transformers import T5Config, T5EncoderModel
    tokenizer = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>")
    cfg = T5Config(vocab_size=tokenizer.vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A 2-layer CLIP (32-wide towers, 16-d projection, 32 px images) with its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    tokenizer = _word_tokenizer(["<pad>", "<bos>", "</s>", "<unk>"], "<bos> $A </s>")
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return Path(folder)


def tiny_pixart(micro: bool = False, seed: int = 0, sample_size: int = 8):
    """A diffusers PixArtTransformer2DModel of 2 blocks, width 96, 4 latent channels, every weight random."""
    import diffusers
    torch.manual_seed(seed)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=96, sample_size=sample_size, patch_size=2, caption_channels=T5_WIDTH,
        use_additional_conditions=micro).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def write_tiny_pixart_pipeline(folder: Path, seed: int = 0) -> Path:
    """PixArt-Sigma's diffusers layout, tiny: transformer/, vae/, text_encoder/, tokenizer/, model_index.json."""
    from ardistill.data.vae import TINY_VAE_CONFIG, LatentCodec
    folder = Path(folder)
    tiny_pixart(seed=seed).save_pretrained(folder / "transformer")
    LatentCodec.from_config(TINY_VAE_CONFIG, seed=seed).vae.save_pretrained(folder / "vae")
    write_tiny_t5(folder / "text_encoder", seed=seed)
    write_tiny_t5(folder / "tokenizer", seed=seed)  # the same tokenizer files (its weights are unused there)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"]}))
    return folder
