"""The tower stages (lmm.towers): in-world pretraining of the visual towers, cached by config.

Tiny towers on the tiny shapes world: the contrastive stage's loss falls and its cache entry holds only the
vision tower (which the CLIP encoder then loads exactly); the same tower config reuses the entry without
training; a changed one trains a new entry; the VAE and U-Net entries load into the fused encoder; two
processes racing for one entry train it once.
"""

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoders.clip import ClipEncoder, build_vision_tower
from lmm.config_loading import load_config

TINY_RECIPE = [
    "encoder.pretrain.text={context_length: 24, width: 32, heads: 2, layers: 1}",
    "encoder.pretrain.embed_dim=32",
    "encoder.pretrain.batch_size=32",
    "encoder.pretrain.steps=60",
    "encoder.pretrain.lr=3e-3",
    "encoder.pretrain.warmup_steps=10",
]
#: The tiny ViT tower (clip_tiny_pretrained's) and the tiny convolutional one (the default's, clip_conv_pretrained).
TINY_CLIP = [
    "encoder=clip_tiny_pretrained",
    "encoder.image_size=32",
    "encoder.patch_size=8",
    "encoder.width=32",
    "encoder.layers=2",
    "encoder.head_width=16",
    *TINY_RECIPE,
]
TINY_CONV = [
    "encoder=clip_conv_pretrained",
    "encoder.image_size=32",
    "encoder.patch_size=4",
    "encoder.width=32",
    "encoder.conv_channels=[8, 16]",
    "encoder.conv_depths=null",  # the library's layout for two stages, not the 3-stage default's [1, 0, 0]
    *TINY_RECIPE,
]


def tower_config(world, cache, extra=(), tower=TINY_CLIP):
    return load_config(
        None,
        [
            f"data.root={world}",
            "data.shapes=null",
            f"towers.cache_dir={cache}",
            "towers.checkpoint_every_n_steps=10",
            "trainer.progress_bar=false",
            "trainer.accelerator=cpu",
            *tower,
            *extra,
        ],
    )


def _entry(cache, kind):
    """The one complete entry of ``kind`` in ``cache`` and its tower.json."""
    (marker,) = Path(cache).glob(f"{kind}-*/tower.json")
    return marker.parent, json.loads(marker.read_text())


@pytest.mark.parametrize("tower", [TINY_CLIP, TINY_CONV], ids=["vit", "convnet"])
def test_contrastive_loss_falls_and_the_entry_holds_only_the_vision_tower(tiny_world, tmp_path, tower):
    from lmm.towers import ensure_towers

    config, summaries = ensure_towers(tower_config(tiny_world, tmp_path / "towers", tower=tower))
    assert [s["stage"] for s in summaries] == ["tower:clip"] and "skipped" not in summaries[0]
    entry, info = _entry(tmp_path / "towers", "clip")
    losses = [loss for _, loss in info["loss_history"]]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)  # from about ln(32) = 3.47, chance for a batch of 32

    # The weight file the encoder loads holds the vision tower and nothing else; no training checkpoint stays.
    assert config.encoder.weights == str(entry / "visual.safetensors")
    visual = load_file(config.encoder.weights)
    encoder = ClipEncoder(config.encoder)
    assert set(visual) == {f"visual.{k}" for k in encoder.tower.state_dict()}
    assert not list(entry.rglob("*.ckpt")) and not (tmp_path / "towers" / f"{entry.name}.partial").exists()
    for key, value in encoder.tower.state_dict().items():
        assert torch.equal(value, visual[f"visual.{key}"]), key
    assert not any(p.requires_grad for p in encoder.tower.parameters())

    # The pretrained towers tell the world's captions apart far better than the random ones they started as.
    trained = _retrieval_accuracy(config, tiny_world, entry)
    assert trained > 2 * _retrieval_accuracy(config, tiny_world, None), trained


def _retrieval_accuracy(config, world, entry):
    """Image -> caption top-1 retrieval over the tiny world's distinct object captions (what the tower trains
    on); ``entry``: the cached towers to load (None: the random initialisation)."""
    from datamodules.captions import load_pairs
    from encoders.pretraining.contrastive import ContrastivePretraining

    module = ContrastivePretraining(config.encoder).eval()
    if entry is not None:
        visual = load_file(str(entry / "visual.safetensors"))
        module.visual.load_state_dict({k.removeprefix("visual."): v for k, v in visual.items()})
        module.text.load_state_dict(load_file(str(entry / "text.safetensors")))
    squares, captions = load_pairs(world / "objects", module.image_transform().squares)
    first = {c: i for i, c in reversed(list(enumerate(captions)))}
    keep = sorted(first.values())
    with torch.no_grad():
        images, texts = module(
            module.image_transform().normalize(squares[keep]), module.tokenizer([captions[i] for i in keep])
        )
    return float(((images @ texts.T).argmax(1) == torch.arange(len(keep))).float().mean())


def test_the_same_tower_config_reuses_the_cache_and_a_changed_one_retrains(tiny_world, tmp_path, monkeypatch):
    from encoders.pretraining.contrastive import ContrastivePretraining
    from lmm.towers import ensure_towers

    cache = tmp_path / "towers"
    first, _ = ensure_towers(tower_config(tiny_world, cache, ["encoder.pretrain.steps=4"]))
    weights = load_file(first.encoder.weights)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tower was trained again")

    with monkeypatch.context() as patch:
        patch.setattr(ContrastivePretraining, "training_step", no_training)
        again, summaries = ensure_towers(tower_config(tiny_world, cache, ["encoder.pretrain.steps=4"]))
    assert summaries == [
        {"stage": "tower:clip", "skipped": True, "entry": str(Path(first.encoder.weights).parent)}
    ]
    assert again.encoder.weights == first.encoder.weights
    assert all(torch.equal(v, load_file(again.encoder.weights)[k]) for k, v in weights.items())
    # A convnet-only field does not touch a ViT's key (entries cached before convnets existed stay valid).
    with monkeypatch.context() as patch:
        patch.setattr(ContrastivePretraining, "training_step", no_training)
        same, _ = ensure_towers(
            tower_config(tiny_world, cache, ["encoder.pretrain.steps=4", "encoder.conv_channels=[4]"])
        )
    assert same.encoder.weights == first.encoder.weights

    # A different recipe (or architecture) is a different tower: a new entry, trained; the old one stays.
    changed, summaries = ensure_towers(
        tower_config(tiny_world, cache, ["encoder.pretrain.steps=4", "encoder.pretrain.lr=1e-3"])
    )
    assert "skipped" not in summaries[0] and changed.encoder.weights != first.encoder.weights
    wider, summaries = ensure_towers(
        tower_config(tiny_world, cache, ["encoder.pretrain.steps=4", "encoder.init_seed=1"])
    )
    assert "skipped" not in summaries[0] and wider.encoder.weights not in (
        first.encoder.weights,
        changed.encoder.weights,
    )
    # The recipe's fixed sine-cosine positions: training left them exactly as built (the other weights moved),
    # and CLIP's learned positions instead make another tower...
    assert first.encoder.pos_embed_type == "sin_cos_2d"
    built = build_vision_tower(first.encoder).state_dict()  # the tower as pretraining starts it
    assert torch.equal(weights["visual.positional_embedding"], built["positional_embedding"])
    assert not torch.equal(weights["visual.conv1.weight"], built["conv1.weight"])
    learned, summaries = ensure_towers(
        tower_config(tiny_world, cache, ["encoder.pretrain.steps=4", "encoder.pos_embed_type=learnable"])
    )
    assert "skipped" not in summaries[0] and len(list(cache.glob("clip-*/tower.json"))) == 4
    # ...whose positions, unlike the fixed ones, training moves away from their random start.
    start = build_vision_tower(learned.encoder).state_dict()["positional_embedding"]
    assert not torch.equal(load_file(learned.encoder.weights)["visual.positional_embedding"], start)


def test_a_tower_trains_with_its_own_thread_count_which_keys_the_cache(tiny_world, tmp_path):
    """The CPU tower's weights depend on the intra-op thread count, so one cache key must mean one thread count:
    the stage trains with towers.num_threads whatever the process uses (and restores the process's count)."""
    from lmm.towers import _TowerStages, ensure_towers

    def config(cache, threads):
        overrides = ["encoder.pretrain.steps=20", f"towers.num_threads={threads}"]
        return tower_config(tiny_world, tmp_path / cache, overrides, tower=TINY_CONV)

    def train(process_threads, cache):
        torch.set_num_threads(process_threads)
        trained, summaries = ensure_towers(config(cache, threads=2))
        assert torch.get_num_threads() == process_threads and "skipped" not in summaries[0]
        return load_file(trained.encoder.weights)

    before = torch.get_num_threads()
    try:
        alone, beside = train(1, "a"), train(2, "b")
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(alone[k], beside[k]) for k in alone)  # unpinned, they differ in the last bits
    one, two = config("c", threads=1), config("c", threads=2)
    assert _TowerStages(one).clip_key(one.encoder) != _TowerStages(two).clip_key(two.encoder)


TINY_FUSED = [
    "encoder=fused_tiny",
    "encoder.image_size=32",
    "encoder.dm_dim=16",
    "encoder.unet_config={block_out_channels: [16, 32, 32, 32], layers_per_block: 1, cross_attention_dim: 32, attention_head_dim: 4, norm_num_groups: 8}",
    "encoder.vae_config={block_out_channels: [8, 16, 16], down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D, DownEncoderBlock2D], up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D, UpDecoderBlock2D], layers_per_block: 1, norm_num_groups: 8}",
    "encoder.clip={name: clip, model: ViT-B-16, image_size: 32, patch_size: 8, width: 32, layers: 2, head_width: 16, pretrain: {text: {context_length: 24, width: 32, heads: 2, layers: 1}, embed_dim: 32, batch_size: 16, steps: 3}}",
    "encoder.pretrain={vae: {steps: 6, batch_size: 8}, unet: {steps: 6, batch_size: 8}}",
]


def test_a_convnet_layout_keys_its_tower_and_the_default_layout_spelled_out_does_not(tiny_world, tmp_path):
    from lmm.towers import _TowerStages

    def key(*extra):
        config = tower_config(tiny_world, tmp_path / "towers", extra, tower=TINY_CONV)
        return _TowerStages(config).clip_key(config.encoder)

    # TINY_CONV has two stages: the default layout is one stride-1 conv after the first, none after the last.
    assert key() == key("encoder.conv_depths=[1, 0]")
    assert len({key(), key("encoder.conv_depths=[0, 0]"), key("encoder.conv_depths=[1, 1]")}) == 3
    # The token smoothing is how the LMM reads the tower, not what the tower is: one cached tower serves both.
    assert key() == key("encoder.smoothing_steps=3", "encoder.smoothing_sigma=0.3")


def test_the_diffusion_towers_load_from_the_cache_into_the_fused_encoder(tiny_world, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from encoders.fused import FusedEncoder
    from lmm.towers import ensure_towers

    base = load_config(
        None,
        [f"data.root={tiny_world}", "data.shapes=null", f"towers.cache_dir={tmp_path / 'towers'}",
         "trainer.progress_bar=false", "trainer.accelerator=cpu", *TINY_FUSED],
    )  # fmt: skip
    config, summaries = ensure_towers(base)
    assert [s["stage"] for s in summaries] == ["tower:clip", "tower:vae", "tower:sd"]
    sd = config.encoder.sd_path
    entry, info = _entry(tmp_path / "towers", "sd")
    assert sd == str(entry)
    _, vae_info = _entry(tmp_path / "towers", "vae")
    assert info["vae"] == vae_info["key"] and info["text"] in config.encoder.clip.weights

    encoder = FusedEncoder(config.encoder)
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae")
    for mine, cached in ((encoder.diffusion.unet, unet), (encoder.diffusion.vae, vae)):
        theirs = cached.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.state_dict().items())
    # The scale the VAE stage measured (1 / std of its latents) is the one the encoder multiplies by.
    assert encoder.diffusion.vae.config.scaling_factor == pytest.approx(vae_info["scaling_factor"])
    assert vae_info["scaling_factor"] != pytest.approx(0.18215)
    clip = load_file(config.encoder.clip.weights)
    for key, value in encoder.diffusion.clip.tower.state_dict().items():
        assert torch.equal(value, clip[f"visual.{key}"]), key
    features = encoder.eval()(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, encoder.num_tokens, encoder.embed_dim) and torch.isfinite(features).all()


def _race(args):
    world, cache, queue = args
    from lmm.towers import ensure_towers

    _, summaries = ensure_towers(tower_config(world, cache, ["encoder.pretrain.steps=3"]))
    queue.put(summaries[0].get("skipped", False))


def test_two_processes_racing_for_one_tower_train_it_once(tiny_world, tmp_path):
    context = mp.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_race, args=((tiny_world, tmp_path / "towers", queue),)) for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sorted(queue.get() for _ in workers) == [False, True]
    assert len(list((tmp_path / "towers").glob("clip-*/tower.json"))) == 1


def test_the_tower_stage_trains_in_towers_precision_which_keys_the_cache(tiny_world, tmp_path):
    from lmm.towers import _TowerStages, ensure_towers

    def config(*extra, cache="keys"):
        return tower_config(tiny_world, tmp_path / cache, extra, tower=TINY_CONV)

    def key(*extra):
        c = config(*extra)
        return _TowerStages(c).clip_key(c.encoder)

    inherited = key()  # towers.precision null: the trainer's, 32-true here
    assert key("towers.precision=32-true") == inherited  # stated or inherited: one tower
    assert key("towers.precision=bf16-mixed") == key("trainer.precision=bf16-mixed") != inherited
    assert key("towers.precision=32-true", "trainer.precision=bf16-mixed") == inherited

    # The stage runs in the tower's precision, whatever the LMM's: bf16 set either way trains the same tower, and
    # one that 32-true does not.
    def weights(*extra):
        trained, _ = ensure_towers(config("encoder.pretrain.steps=3", *extra, cache="-".join(extra)))
        return load_file(trained.encoder.weights)

    bf16, inherited_bf16, fp32 = (
        weights("towers.precision=bf16-mixed"),
        weights("trainer.precision=bf16-mixed"),
        weights("towers.precision=32-true", "trainer.precision=bf16-mixed"),
    )
    assert all(torch.equal(bf16[k], inherited_bf16[k]) for k in bf16)
    assert not all(torch.equal(bf16[k], fp32[k]) for k in bf16)
