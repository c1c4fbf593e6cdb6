"""Export a model to transformers' LLaVA format: ``python -m lmm.export hf --run runs/NAME --out DIR``.

The folder holds a ``LlavaForConditionalGeneration`` (config, safetensors, generation config) and its
``LlavaProcessor`` (``LlavaImageProcessor`` + tokenizer + chat template), so transformers, vLLM, SGLang or
lmms-eval's ``llava_hf`` load it with no project code and compute the same logits as the project's model:

- vision tower: the CLIP encoder as a ``CLIPVisionModel`` (an open_clip tower renamed, ``encoders.clip_hf``;
  an HF tower as loaded, all its layers), ``vision_feature_layer`` = the encoder's ``select_layer``,
  ``vision_feature_select_strategy: default`` (the CLS token dropped), QuickGELU or GELU as trained;
- projector: ``mlp2x_gelu`` as ``multi_modal_projector.linear_1`` / ``linear_2`` (exact GELU);
- language model: the causal LM itself (a LoRA is merged first, with peft's ``merge_and_unload``); when the
  ``<image>`` id lies outside its embedding table (a released Vicuna with ``<image>`` added), the table and
  the output head grow by the missing rows and the generation config suppresses those ids;
- image processor: the aspect the model was trained with. ``pad`` is LLaVA's ``expand2square`` with
  ``int(255 * mean)`` then the resize (``LlavaImageProcessor``'s ``do_pad``), ``crop`` the short-side resize and
  centre crop, ``resize`` the squash to a square; bicubic, antialiased, like ``encoders.base.ImageTransform``
  (transformers' default torchvision back-end gives a run's pixels exactly; a released LLaVA-1.5 was trained
  on PIL's resize: ``AutoProcessor.from_pretrained(folder, backend="pil")`` gives LLaVA's pixels exactly);
- chat template: the run's template rendered in Jinja (``<image>\\n`` leads the user turn that has an image, or
  ``\\n<image>`` ends it for a template that puts the question first).

The DiffLMM (diffusion / fused) encoders and projectors with positional embeddings or LLaVA-1's ``linear``
layout have no equivalent in the stock class and are refused with a one-line message. From a released
LLaVA-1.5: ``python -m lmm.export hf --llava15 WEIGHTS --clip CLIP --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datamodules.templates import IMAGE_PLACEHOLDER, Template, get_template
from encoders.clip_hf import UnsupportedTower, hf_hidden_state_index, hf_tower_equals, open_clip_to_hf_vision
from lmm.model import LMM

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A model the stock ``LlavaForConditionalGeneration`` cannot represent; the message says why in one line."""


# ------------------------------------------------------------------------------------------- chat template


def chat_template_jinja(template: Template) -> str:
    """``template`` as a Jinja chat template for ``apply_chat_template`` (messages with string content or
    lists of ``{"type": "image"}`` / ``{"type": "text"}`` parts); renders what ``Template.prompt`` and
    ``Template.render`` produce. A leading system message replaces the template's system line."""
    # The content of a message -> (has an image, its text); an "<image>" inside string content counts.
    parts = (
        "{%- if message['content'] is string -%}"
        "{%- set ns.image = '" + IMAGE_PLACEHOLDER + "' in message['content'] -%}"
        "{%- set ns.text = message['content'] -%}"
        "{%- else -%}"
        "{%- set ns.image = message['content'] | selectattr('type', 'equalto', 'image') | list | length > 0 -%}"
        "{%- set ns.text = message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('\\n') -%}"
        "{%- endif -%}"
    )
    if template.name == "plain":
        # Pretraining format: the bare image, then the caption and a newline; user text is not shown.
        return (
            "{%- set ns = namespace(image=false, text='') -%}"
            "{%- for message in messages -%}" + parts + "{%- if message['role'] == 'user' -%}"
            "{%- if ns.image -%}{{ '" + IMAGE_PLACEHOLDER + "' }}{%- endif -%}"
            "{%- elif message['role'] == 'assistant' -%}{{ ns.text + '\\n' }}"
            "{%- endif -%}{%- endfor -%}"
        )

    def q(text: str) -> str:  # a Jinja string literal (JSON escaping is valid Jinja escaping here)
        return json.dumps(text, ensure_ascii=False)

    question = "(ns.text | replace(" + q(IMAGE_PLACEHOLDER) + ", '') | trim)"
    if template.image_first:
        image_turn = q(IMAGE_PLACEHOLDER + "\n") + " + " + question
    else:
        image_turn = question + " + " + q("\n" + IMAGE_PLACEHOLDER)

    return (
        "{%- set ns = namespace(image=false, text='', system=" + q(template.system) + ") -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set message = messages[0] -%}" + parts + "{%- set ns.system = ns.text -%}"
        "{%- set messages = messages[1:] -%}"
        "{%- endif -%}"
        "{%- if ns.system -%}{{ ns.system + " + q(template.sep) + " }}{%- endif -%}"
        "{%- for message in messages -%}" + parts + "{%- if message['role'] == 'user' -%}"
        "{{ " + q(template.user + ": ") + " }}"
        "{%- if ns.image -%}{{ " + image_turn + " }}"
        "{%- else -%}{{ ns.text }}{%- endif -%}"
        "{{ " + q(template.sep) + " }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ " + q(template.assistant + ": ") + " + ns.text + " + q(template.sep2) + " }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + q(template.assistant + ":") + " }}{%- endif -%}"
    )


# ------------------------------------------------------------------------------------------ model parts


def image_processor_for(size: int, mean: Sequence[float], std: Sequence[float], aspect: str) -> Any:
    """A ``LlavaImageProcessor`` reproducing ``ImageTransform(size, mean, std, aspect)``."""
    from transformers import LlavaImageProcessor

    common = dict(
        image_mean=list(mean),
        image_std=list(std),
        resample=3,  # PIL bicubic; the torchvision back-end resizes antialiased, as ImageTransform does
        do_convert_rgb=True,
        do_rescale=True,
        do_normalize=True,
    )
    if aspect in ("pad", "crop"):
        return LlavaImageProcessor(
            do_pad=aspect == "pad",
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            **common,
        )
    if aspect == "resize":
        return LlavaImageProcessor(
            do_pad=False,
            size={"height": size, "width": size},
            do_center_crop=False,
            crop_size={"height": size, "width": size},
            **common,
        )
    raise ExportError(f"image aspect {aspect!r} is not pad, crop or resize")


def vision_tower_for(model: LMM) -> tuple[Any, dict[str, Tensor], int]:
    """(CLIPVisionConfig, CLIPVisionModel state dict, vision_feature_layer) of the model's CLIP encoder."""
    encoder = model.encoder
    name = getattr(encoder.config, "name", type(encoder).__name__)
    if name != "clip":
        raise ExportError(
            f"encoder {name!r} (DiffLMM's diffusion / fused towers) has no LlavaForConditionalGeneration "
            "equivalent; only the clip encoder exports"
        )
    if encoder.backend == "convnet":
        raise ExportError(
            "a convnet CLIP tower (encoder.model: convnet) has no CLIPVisionModel equivalent; only ViT towers export"
        )
    layer = hf_hidden_state_index(encoder.config.select_layer, encoder.backend)
    if encoder.backend == "open_clip":
        try:
            config, state = open_clip_to_hf_vision(encoder.tower)
        except UnsupportedTower as err:
            raise ExportError(str(err)) from None
        return config, state, layer
    # The HF tower was truncated after the selected layer when it was loaded; export it whole, as
    # llava-hf checkpoints hold it, after checking the kept layers are the folder's.
    from transformers import CLIPVisionModel

    full = CLIPVisionModel.from_pretrained(
        encoder.config.weights, dtype=next(encoder.tower.parameters()).dtype
    )
    if not hf_tower_equals(encoder.tower, full):
        raise ExportError(
            f"the encoder's CLIP weights differ from its folder {encoder.config.weights}; cannot export the full tower"
        )
    return full.config, full.state_dict(), layer


def projector_state(model: LMM) -> dict[str, Tensor]:
    projector = model.projector
    if projector.pos_embed is not None:
        raise ExportError(
            "a projector with positional embeddings (DiffLMM's) has no LlavaForConditionalGeneration equivalent"
        )
    mlp = projector.mlp
    if not (isinstance(mlp, torch.nn.Sequential) and len(mlp) == 3 and isinstance(mlp[1], torch.nn.GELU)):
        raise ExportError(
            f"projector {type(mlp).__name__} is not mlp2x_gelu (LLaVA-1's linear projector has no stock equivalent)"
        )
    if mlp[1].approximate != "none":
        raise ExportError(
            "the projector's GELU is tanh-approximated; LlavaForConditionalGeneration's 'gelu' is exact"
        )
    return {
        "linear_1.weight": mlp[0].weight,
        "linear_1.bias": mlp[0].bias,
        "linear_2.weight": mlp[2].weight,
        "linear_2.bias": mlp[2].bias,
    }


def merge_lora(model: LMM) -> None:
    """Merge the LLM's LoRA adapters into its weights in place (peft ``merge_and_unload``)."""
    llm = model.llm
    if not llm.lora_enabled:
        return
    llm.model = llm.model.merge_and_unload()
    llm.lora_enabled = False
    log.info("merged the LoRA adapters into the language model")


def _language_model_state(causal: torch.nn.Module, vocab: int) -> tuple[dict[str, Tensor], list[int]]:
    """The causal LM's weights under Llava's names, its vocabulary grown to ``vocab`` rows; the new row ids."""
    base = getattr(causal, causal.base_model_prefix)
    head = causal.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ExportError("a language-model head with a bias has no LlavaForConditionalGeneration equivalent")
    state = {f"model.language_model.{k}": v for k, v in base.state_dict().items()}
    embeddings = base.get_input_embeddings()
    embed_key = next(f"model.language_model.{n}.weight" for n, m in base.named_modules() if m is embeddings)
    state["lm_head.weight"] = head.weight
    old = head.weight.shape[0]
    added = list(range(old, vocab))
    if added:
        # Rows for ids the tokenizer gained (``<image>``): never read as inputs (image features replace them)
        # and suppressed in generation; zeros keep the head's other logits unchanged.
        for key in (embed_key, "lm_head.weight"):
            weight = state[key]
            state[key] = torch.cat([weight, weight.new_zeros(len(added), weight.shape[1])])
    return state, added


# ------------------------------------------------------------------------------------------------ export


@torch.no_grad()
def export_llava_hf(
    model: LMM,
    out: str | Path,
    *,
    template: str,
    aspect: str,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as a transformers LLaVA folder (see the module docstring); returns the folder.

    A LoRA is merged into the language model in place first. Nothing is written when the model cannot be
    represented (``ExportError``).
    """
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    chat = get_template(template)
    vision_config, vision_state, feature_layer = vision_tower_for(model)
    projector = projector_state(model)
    encoder = model.encoder
    processor_images = image_processor_for(encoder.image_size, encoder.image_mean, encoder.image_std, aspect)
    merge_lora(model)
    causal = model.llm.causal_lm()
    tokenizer = model.llm.tokenizer
    image_id = model.llm.image_token_id
    vocab = max(causal.get_input_embeddings().weight.shape[0], image_id + 1)
    text_state, added = _language_model_state(causal, vocab)
    text_config = causal.config.__class__.from_dict(causal.config.to_dict())
    text_config.vocab_size = vocab
    dtype = dtype or causal.get_input_embeddings().weight.dtype

    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_id,
        image_seq_length=encoder.num_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.dtype = dtype
    state = {
        **{f"model.vision_tower.{k}": v for k, v in vision_state.items()},
        **{f"model.multi_modal_projector.{k}": v for k, v in projector.items()},
        **text_state,
    }
    state = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in state.items()}
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    expected = set(hf.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
        expected.discard("lm_head.weight")
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ExportError(
            f"weights do not fit LlavaForConditionalGeneration (missing {missing[:3]}, extra {extra[:3]})"
        )
    hf.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()  # the head shares the (assigned) input embeddings

    stop = sorted({tokenizer.eos_token_id, *_stop_ids(chat, tokenizer)})
    hf.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        suppress_tokens=added or None,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=processor_images,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template_jinja(chat),
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )
    processor.save_pretrained(out)
    log.info(
        "exported to %s (template %s, aspect %s, %s)",
        out,
        chat.name,
        aspect,
        str(dtype).removeprefix("torch."),
    )
    return out


def _stop_ids(template: Template, tokenizer: Any) -> list[int]:
    if template.stop_text == tokenizer.eos_token:
        return []
    return [tokenizer(template.stop_text, add_special_tokens=False)["input_ids"][-1]]


# --------------------------------------------------------------------------------------------------- CLI


def _run_encoder_name(run: Path) -> str | None:
    """``encoder.name`` of a run's config.yaml (``clip/convnet`` for the convolutional CLIP tower), read without
    building anything."""
    from omegaconf import OmegaConf

    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"--run {run} is not a run directory (no config.yaml)")
    encoder = OmegaConf.load(path).get("encoder", {})
    name = encoder.get("name")
    return f"{name}/convnet" if name == "clip" and encoder.get("model") == "convnet" else name


def main(argv: Sequence[str] | None = None) -> int:
    from lmm.model_source import DTYPES, load_model_source

    parser = argparse.ArgumentParser(prog="python -m lmm.export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="transformers LlavaForConditionalGeneration + LlavaProcessor folder")
    source = hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run directory of a trained model")
    source.add_argument("--llava15", type=Path, help="released LLaVA-1.5 weights folder (original layout)")
    hf.add_argument("--clip", type=Path, default=None, help="CLIP tower folder of --llava15")
    hf.add_argument("--out", type=Path, required=True)
    hf.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the model's")
    hf.add_argument(
        "--template", default=None, help="chat template (default: the one the model was tuned with)"
    )
    hf.add_argument("--aspect", choices=("pad", "crop", "resize"), default=None, help="default: as trained")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} exists and is not empty")
    if args.run is not None:
        encoder = _run_encoder_name(args.run)
        if encoder != "clip":  # refuse before the model is built
            print(
                f"cannot export run {args.run}: encoder {encoder!r} has no LlavaForConditionalGeneration equivalent"
            )
            return 2
    loaded = load_model_source(
        run=args.run, llava15=args.llava15, clip=args.clip, dtype=args.dtype or "float32"
    )
    try:
        out = export_llava_hf(
            loaded.model,
            args.out,
            template=args.template or loaded.template,
            aspect=args.aspect or loaded.aspect,
            dtype=DTYPES[args.dtype] if args.dtype else None,
        )
    except ExportError as err:
        print(f"cannot export {loaded.description}: {err}")
        return 2
    print(f"wrote {out} (LlavaForConditionalGeneration + LlavaProcessor)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
