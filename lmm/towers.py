"""The tower stages of a run: pretrain the config's visual towers in-world, once, before the LMM stages.

``ensure_towers(config)`` looks at the encoder section: a CLIP tower with ``pretrain`` (the encoder's own, or a
diffusion encoder's ``clip``) is trained contrastively (``encoders.pretraining.contrastive``); a diffusion
encoder with ``pretrain`` gets its VAE (``encoders.pretraining.vae``) and then its U-Net
(``encoders.pretraining.unet``, conditioned on the CLIP recipe's text tower). Each is an entry of the tower
cache (``lmm.tower_cache``, under ``towers.cache_dir``) keyed by its architecture, recipe, data and numerics
(device, precision and, on the CPU, ``towers.num_threads``, which the stage trains with): present
-> reused without training; absent -> trained with its own Lightning Trainer (TensorBoard logs and resumable
checkpoints in the entry) and published. The returned config names the cached files (``encoder.weights``,
``encoder.sd_path``), which the encoders load frozen; the run's config.yaml records them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from encoders.config import ClipEncoderConfig, DiffusionEncoderConfig, default_conv_depths
from lmm.config import TrainConfig
from lmm.tower_cache import TowerCache, data_fingerprint, tower_key

log = logging.getLogger(__name__)

#: The files a complete entry of each kind keeps.
ENTRY_FILES = {
    "clip": ("visual.safetensors", "text.safetensors", "tensorboard"),
    "vae": ("vae", "tensorboard"),
    "sd": ("unet", "vae", "scheduler", "tensorboard"),
}
CLIP_WEIGHTS = "visual.safetensors"


def tower_numerics(config: TrainConfig) -> dict[str, Any]:
    """What of the run's hardware settings decides a tower's weights, for its cache key: the device kind, the
    precision and, on the CPU, the thread count it trains with (``towers.num_threads``)."""
    import torch

    device = {"gpu": "cuda"}.get(config.trainer.accelerator, config.trainer.accelerator)
    if device == "auto":  # as Lightning resolves it
        device = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    threads = config.towers.num_threads if device == "cpu" else None
    return {"device": device, "precision": str(tower_precision(config)), "threads": threads}


def tower_precision(config: TrainConfig) -> str:
    """The precision the tower stages train in: ``towers.precision``, else the run's ``trainer.precision``."""
    return config.towers.precision or config.trainer.precision


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the caller's count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def towers_data_dir(config: TrainConfig) -> Path:
    data = Path(config.towers.data)
    return data if data.is_absolute() else Path(config.data.root) / data


def ensure_towers(config: TrainConfig) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """Train or reuse every tower ``config.encoder`` pretrains; returns the config naming the cached files and
    one summary per tower stage (``skipped`` when the cache had it)."""
    encoder = config.encoder
    needs_clip = getattr(encoder, "pretrain", None) is not None or (
        isinstance(encoder, DiffusionEncoderConfig) and encoder.clip.pretrain is not None
    )
    if not needs_clip:
        return config, []
    stages = _TowerStages(config)
    if isinstance(encoder, DiffusionEncoderConfig):
        clip = encoder.clip
        if clip.pretrain is not None:
            clip = stages.clip(clip)
        sd_path = encoder.sd_path
        if encoder.pretrain is not None:
            sd_path = str(stages.stable_diffusion(encoder, clip))
        encoder = dataclasses.replace(encoder, clip=clip, sd_path=sd_path)
    else:
        encoder = stages.clip(encoder)
    return dataclasses.replace(config, encoder=encoder), stages.summaries


class _TowerStages:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.cache = TowerCache(config.towers.cache_dir)
        self.data = towers_data_dir(config)
        self.fingerprint = data_fingerprint(self.data)
        self.numerics = tower_numerics(config)
        self.summaries: list[dict[str, Any]] = []

    # --------------------------------------------------------------------------------------------- CLIP
    def clip_key(self, clip: ClipEncoderConfig) -> str:
        architecture = dataclasses.asdict(clip)
        # select_layer and the token smoothing: how the LMM reads the tower, not what the tower is
        for irrelevant in (
            "name",
            "weights",
            "pretrain",
            "select_layer",
            "smoothing_steps",
            "smoothing_sigma",
        ):
            architecture.pop(irrelevant)
        if clip.model != "convnet":  # a ViT's key stays what it was before convnets existed
            architecture.pop("conv_channels")
        depths = clip.conv_depths
        if depths is None or tuple(depths) == default_conv_depths(len(clip.conv_channels)):
            architecture.pop("conv_depths")  # the default layout, spelled out or not, keeps its earlier key
        return tower_key(
            {"kind": "clip", "architecture": architecture, "recipe": dataclasses.asdict(clip.pretrain),
             "data": self.fingerprint, "numerics": self.numerics}
        )  # fmt: skip

    def clip(self, clip: ClipEncoderConfig) -> ClipEncoderConfig:
        """Train or reuse the contrastive CLIP tower of ``clip.pretrain``; ``clip`` naming its weight file."""
        key = self.clip_key(clip)
        weights = str(self.cache.entry("clip", key) / CLIP_WEIGHTS)
        if clip.weights is not None and Path(clip.weights) != Path(weights):
            raise ValueError(
                f"encoder.weights {clip.weights} is not the cached tower of encoder.pretrain ({weights}): "
                "set one of them"
            )
        self._ensure(
            "clip",
            key,
            lambda work: self._train_clip(clip, work),
            {"recipe": dataclasses.asdict(clip.pretrain)},
        )
        return dataclasses.replace(clip, weights=weights)

    def _train_clip(self, clip: ClipEncoderConfig, work: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        from encoders.pretraining.contrastive import ContrastivePretraining

        module = ContrastivePretraining(clip)
        recipe = clip.pretrain
        self._fit(
            module, "tower:clip", recipe.steps, recipe.batch_size, recipe.seed, work, recipe.distinct_captions
        )
        save_file(module.vision_state(), str(work / CLIP_WEIGHTS))
        save_file(module.text_state(), str(work / "text.safetensors"))
        return {"loss_history": module.loss_history}

    def text_tower(self, clip: ClipEncoderConfig) -> Any:
        """The frozen text tower of ``clip``'s cached entry (what the U-Net is conditioned with)."""
        from safetensors.torch import load_file

        from encoders.pretraining.contrastive import build_text_tower

        recipe = clip.pretrain
        tower = build_text_tower(recipe.text, recipe.embed_dim, clip.quick_gelu, seed=recipe.seed)
        path = self.cache.entry("clip", self.clip_key(clip)) / "text.safetensors"
        tower.load_state_dict(load_file(str(path)))
        return tower.requires_grad_(False).eval()

    # ------------------------------------------------------------------------------------- VAE, U-Net
    def vae_key(self, encoder: DiffusionEncoderConfig) -> str:
        return tower_key(
            {"kind": "vae", "vae_config": encoder.vae_config, "image_size": encoder.image_size,
             "init_seed": encoder.init_seed, "aspect": encoder.pretrain.aspect,
             "recipe": dataclasses.asdict(encoder.pretrain.vae), "data": self.fingerprint, "numerics": self.numerics}
        )  # fmt: skip

    def stable_diffusion(self, encoder: DiffusionEncoderConfig, clip: ClipEncoderConfig) -> Path:
        """Train or reuse the VAE, then the U-Net; returns the U-Net entry, a Stable-Diffusion-layout folder."""
        vae_key = self.vae_key(encoder)
        self._ensure(
            "vae", vae_key, lambda work: self._train_vae(encoder, work),
            {"recipe": dataclasses.asdict(encoder.pretrain.vae)},
        )  # fmt: skip
        clip_key = self.clip_key(clip)
        sd_key = tower_key(
            {"kind": "sd", "unet_config": encoder.unet_config, "scheduler_config": encoder.scheduler_config,
             "image_size": encoder.image_size, "init_seed": encoder.init_seed, "aspect": encoder.pretrain.aspect,
             "recipe": dataclasses.asdict(encoder.pretrain.unet), "vae": vae_key, "text": clip_key,
             "data": self.fingerprint, "numerics": self.numerics}
        )  # fmt: skip
        vae_dir = self.cache.entry("vae", vae_key) / "vae"
        self._ensure(
            "sd", sd_key, lambda work: self._train_unet(encoder, clip, vae_dir, work),
            {"recipe": dataclasses.asdict(encoder.pretrain.unet), "vae": vae_key, "text": clip_key},
        )  # fmt: skip
        return self.cache.entry("sd", sd_key)

    def _train_vae(self, encoder: DiffusionEncoderConfig, work: Path) -> dict[str, Any]:
        from encoders.pretraining.vae import VaePretraining

        module = VaePretraining(encoder)
        recipe = encoder.pretrain.vae
        datamodule = self._fit(module, "tower:vae", recipe.steps, recipe.batch_size, recipe.seed, work)
        squares = datamodule.pairs.squares
        scale = module.latent_scale(squares[i : i + 64] for i in range(0, min(len(squares), 512), 64))
        module.vae.register_to_config(scaling_factor=scale)
        module.vae.save_pretrained(work / "vae")
        return {"loss_history": module.loss_history, "scaling_factor": scale}

    def _train_unet(
        self, encoder: DiffusionEncoderConfig, clip: ClipEncoderConfig, vae_dir: Path, work: Path
    ) -> dict[str, Any]:
        from diffusers import AutoencoderKL

        from encoders.pretraining.unet import UnetPretraining

        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
        module = UnetPretraining(encoder, vae, self.text_tower(clip))
        recipe = encoder.pretrain.unet
        self._fit(module, "tower:sd", recipe.steps, recipe.batch_size, recipe.seed, work)
        module.unet.save_pretrained(work / "unet")
        module.scheduler.save_pretrained(work / "scheduler")
        shutil.copytree(vae_dir, work / "vae", dirs_exist_ok=True)
        return {"loss_history": module.loss_history}

    # ------------------------------------------------------------------------------------------ common
    def _ensure(
        self, kind: str, key: str, train: Callable[[Path], dict[str, Any]], describe: dict[str, Any]
    ) -> None:
        name = f"tower:{kind}"
        with self.cache.lock(kind, key):
            entry = self.cache.entry(kind, key)
            if self.cache.is_complete(kind, key):
                log.info("%s: reusing %s", name, entry)
                self.summaries.append({"stage": name, "skipped": True, "entry": str(entry)})
                return
            work = self.cache.work_dir(kind, key)
            resuming = (work / "last.ckpt").is_file()
            log.info("%s: %s %s", name, "resuming in" if resuming else "training into", entry)
            work.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            with pinned_threads(self.config.towers.num_threads):
                info = train(work)
            seconds = round(time.perf_counter() - start, 1)
            history = info.get("loss_history") or []
            final = round(history[-1][1], 4) if history else None
            info = {"kind": kind, "key": key, "data": str(self.data), "data_sha256": self.fingerprint,
                    "seconds": seconds, **describe, **info}  # fmt: skip
            self.cache.publish(kind, key, info, keep=ENTRY_FILES[kind])
            summary = {"stage": name, "seconds": seconds, "final_loss": final, "entry": str(entry)}
            log.info("%s done: %s", name, summary)
            self.summaries.append(summary)

    def _fit(
        self,
        module: Any,
        name: str,
        steps: int,
        batch_size: int,
        seed: int,
        work: Path,
        distinct_captions: bool = False,
    ) -> Any:
        import lightning as L
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.loggers import TensorBoardLogger

        from datamodules.captions import ImageCaptionDataModule
        from lmm.checkpoint_io import AtomicCheckpointIO
        from lmm.progress import StageProgress

        trainer_config = self.config.trainer
        datamodule = ImageCaptionDataModule(
            self.data, module.image_transform(), batch_size, seed=seed, distinct_captions=distinct_captions
        )
        L.seed_everything(seed, verbose=False)
        trainer = L.Trainer(
            accelerator=trainer_config.accelerator,
            devices=1,
            precision=tower_precision(self.config),
            max_steps=steps,
            gradient_clip_val=trainer_config.gradient_clip_val,
            log_every_n_steps=min(trainer_config.log_every_n_steps, steps),
            enable_progress_bar=False,  # StageProgress: the tower's steps, in a terminal and in a log
            enable_model_summary=False,
            default_root_dir=work,
            plugins=[AtomicCheckpointIO()],
            logger=TensorBoardLogger(save_dir=work, name="tensorboard", version="", default_hp_metric=False),
            callbacks=[
                ModelCheckpoint(
                    dirpath=work,
                    filename="step-{step}",
                    save_last=True,
                    save_top_k=0,
                    every_n_train_steps=self.config.towers.checkpoint_every_n_steps,
                ),
                StageProgress(
                    name,
                    steps,
                    trainer_config.progress_every_n_steps,
                    bar=trainer_config.progress_bar and StageProgress.terminal(),
                ),
            ],
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        resume = work / "last.ckpt"
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=resume if resume.is_file() else None, weights_only=True
        )
        module.eval()
        return datamodule
