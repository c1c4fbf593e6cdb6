"""Tiny random transformers VLM folders for the ``grounding.hf`` adapter tests: the real model, processor and
image-processor classes of each family, with that family's special tokens, chat format and preprocessing
settings, shrunk to a few pixels and a few layers, written with ``save_pretrained`` (no downloads).

The tokenizer is a word-level ``PreTrainedTokenizerFast`` whose vocabulary covers the prompts and a caption
(so a random model's responses are words spaCy can parse) plus the family's special tokens as named special
tokens (``tokenizer.image_token``, ``boi_token`` ... as the real tokenizers carry them). The chat templates
are the families' formats written compactly (system line, role markers, where the image placeholder goes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

QUESTIONS = ["Describe the image in detail.", "Describe the image."]
CAPTION = "There is a large red square in the top left and a small blue circle in the middle."
PLAIN = [
    "<image>\nDescribe the image in detail.",
    CAPTION,
    "You are a helpful assistant.",
    "system user assistant",
]

QWEN_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
QWEN_EXTRA = ["<|im_start|>", "<|im_end|>"]
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n{% elif content['type'] == 'text' %}{{ content['text'] + ' ' }}"
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] + ' ' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'text' %}{{ '\n' + content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
GEMMA3_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<start_of_image>{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}{% endfor %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_EXTRA = ["<start_of_turn>", "<end_of_turn>"]


W_WIDE, H_WIDE = 150, 84
W_TALL, H_TALL = 70, 120


def coded_image(width: int, height: int, seed: int = 1) -> Image.Image:
    """Red encodes x (0 at the left edge, 255 at the right), green y, blue is noise: a processed pixel's red and
    green say which image point the model's preprocessing put there (see ``decode_xy``)."""
    rng = np.random.default_rng(seed)
    x = np.round(255 * np.arange(width) / (width - 1))
    y = np.round(255 * np.arange(height) / (height - 1))
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = x[None, :]
    pixels[..., 1] = y[:, None]
    pixels[..., 2] = rng.integers(0, 255, (height, width))
    return Image.fromarray(pixels)


def images() -> list[Image.Image]:
    """Two images of different sizes and aspect ratios: wide (150x84) and tall (70x120)."""
    return [coded_image(W_WIDE, H_WIDE, 1), coded_image(W_TALL, H_TALL, 2)]


def decode_xy(pixels: torch.Tensor, mean, std, size: tuple[int, int]) -> tuple[float, float]:
    """The image point ``(x, y)`` whose code is the mean of normalised ``(3, ...)`` processed pixels."""
    height, width = size
    flat = pixels.reshape(3, -1).double().mean(dim=1)
    red, green = (flat[:2] * torch.tensor(std[:2]).double() + torch.tensor(mean[:2]).double()) * 255
    return float(red) / 255 * (width - 1), float(green) / 255 * (height - 1)


def tokenizer(named: dict[str, str] | None = None, extra: list[str] = (), chat_template: str | None = None):
    """A word-level tokenizer over ``PLAIN`` with the given named special tokens and further special ones."""
    from transformers import PreTrainedTokenizerFast

    from datamodules.word_tokenizer import build_word_tokenizer

    base = build_word_tokenizer(PLAIN + QUESTIONS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=dict(named or {}),
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *extra]})
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Larger random weights than the default init, so attention is far from uniform."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)


def _text(tok, **overrides) -> dict:
    config = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config.update(overrides)
    return config


def _save(folder: Path, model, processor, seed: int) -> Path:
    randomise(model, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_llava(folder: Path, seed: int = 0, tok=None) -> Path:
    """LLaVA-1.5 (llava-hf): a CLIP tower (32 px, 8-px patches, CLS dropped by the processor's count)."""
    import transformers as tf

    tok = tok if tok is not None else tokenizer(chat_template=LLAVA_TEMPLATE)
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_clip_vision(32, 8)),
        text_config=tf.LlamaConfig(**_text(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS feature, as llava-hf's processor_config.json says
        chat_template=tok.chat_template,
    )
    return _save(folder, tf.LlavaForConditionalGeneration(config), processor, seed)


def write_qwen_vl(folder: Path, version: str = "2.5", seed: int = 0) -> Path:
    """Qwen2-VL / Qwen2.5-VL (14-px patches, 2x2 merge) or Qwen3-VL (16-px patches)."""
    import transformers as tf

    tok = tokenizer(QWEN_TOKENS, QWEN_EXTRA, QWEN3_TEMPLATE if version == "3" else QWEN2_TEMPLATE)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in QWEN_TOKENS.items()}
    common = dict(
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
    )
    if version == "3":
        patch = 16
        text = _text(tok, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=patch,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **common)
        model = tf.Qwen3VLForConditionalGeneration(config)
        processor_class = tf.Qwen3VLProcessor
        mean = std = [0.5, 0.5, 0.5]
    else:
        patch = 14
        text = _text(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
        if version == "2":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=patch)
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
            model = tf.Qwen2VLForConditionalGeneration(config)
            processor_class = tf.Qwen2VLProcessor
        else:
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=patch,
                window_size=56,
                fullatt_block_indexes=[1],
            )
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
            model = tf.Qwen2_5_VLForConditionalGeneration(config)
            processor_class = tf.Qwen2_5_VLProcessor
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    image_processor = tf.Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=mean,
        image_std=std,
        size={"shortest_edge": (2 * patch) ** 2, "longest_edge": 1280 * (2 * patch) ** 2},
    )
    video_processor = (tf.Qwen3VLVideoProcessor if version == "3" else tf.Qwen2VLVideoProcessor)(
        patch_size=patch, merge_size=2, temporal_patch_size=2
    )
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=tok.chat_template,
    )
    return _save(folder, model, processor, seed)


def write_internvl(folder: Path, seed: int = 0) -> Path:
    """InternVL (the transformers port): 56-px tiles of 14-px patches, pixel shuffle 0.5 -> 2x2 tokens per tile."""
    import transformers as tf

    tok = tokenizer(INTERNVL_TOKENS, QWEN_EXTRA, INTERNVL_TEMPLATE)
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[56, 56],
        patch_size=[14, 14],
    )
    config = tf.InternVLConfig(
        vision_config=vision,
        text_config=dict(model_type="qwen2", **_text(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    model = tf.InternVLForConditionalGeneration(config)
    image_processor = tf.GotOcr2ImageProcessor(
        size={"height": 56, "width": 56},
        crop_to_patches=False,
        min_patches=1,
        max_patches=12,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    video_processor = tf.InternVLVideoProcessor(size={"height": 56, "width": 56})
    processor = tf.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_length=4,
        chat_template=tok.chat_template,
    )
    return _save(folder, model, processor, seed)


def _clip_vision(image_size: int, patch: int) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )


NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def write_llava_next(folder: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT: a CLIP tower (32 px, 8-px patches, CLS dropped) and any-resolution tiles of 32 px."""
    import transformers as tf

    tok = tokenizer(extra=[], chat_template=LLAVA_TEMPLATE)
    config = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(**_clip_vision(32, 8)),
        text_config=tf.LlamaConfig(**_text(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_select_strategy="default",
    )
    model = tf.LlavaNextForConditionalGeneration(config)
    processor = tf.LlavaNextProcessor(
        image_processor=tf.LlavaNextImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=NEXT_PINPOINTS,
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS feature, as llava-hf's processor_config.json says
        chat_template=tok.chat_template,
    )
    return _save(folder, model, processor, seed)


def write_llava_onevision(folder: Path, seed: int = 0, vision_aspect_ratio: str = "anyres_max_4") -> Path:
    """LLaVA-OneVision: a SigLIP tower (28 px, 7-px patches, no CLS) and 28-px tiles. ``anyres_max_4`` makes the
    model shrink every high-resolution grid of more than 1.1 tiles' worth of tokens (bilinear), as
    ``anyres_max_9`` does for large images in the real model."""
    import transformers as tf

    tok = tokenizer(extra=["<video>", *QWEN_EXTRA], chat_template=ONEVISION_TEMPLATE)
    pinpoints = [[28 * r, 28 * c] for r in range(1, 4) for c in range(1, 4)]
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
    )
    config = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=dict(model_type="qwen2", **_text(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=vision_aspect_ratio,
        vision_feature_select_strategy="full",
    )
    model = tf.LlavaOnevisionForConditionalGeneration(config)
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(
            size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tok,
        video_processor=tf.LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28}),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=tok.chat_template,
    )
    return _save(folder, model, processor, seed)


def write_gemma3(folder: Path, seed: int = 0, sliding_window: int = 6) -> Path:
    """Gemma 3: a SigLIP tower (64 px, 4-px patches) pooled to 4x4 tokens, a text model whose first layer uses a
    sliding window much shorter than the prompt (so image keys leave it) and bidirectional image blocks."""
    import transformers as tf

    tok = tokenizer(GEMMA3_TOKENS, GEMMA3_EXTRA, GEMMA3_TEMPLATE)
    text = _text(
        tok,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=4,
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = tf.Gemma3ForConditionalGeneration(config)
    processor = tf.Gemma3Processor(
        image_processor=tf.Gemma3ImageProcessor(
            size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tok,
        image_seq_length=16,
        chat_template=tok.chat_template,
    )
    return _save(folder, model, processor, seed)
