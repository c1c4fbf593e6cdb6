"""In-world pretraining of the visual towers: one LightningModule per tower stage.

The real recipe freezes towers that were pretrained elsewhere (CLIP contrastively, Stable Diffusion's VAE
and U-Net by reconstruction and denoising). With nothing to download, the shapes world pretrains tiny
versions of the same classes on its own image-caption pairs: ``contrastive`` (CLIP with open_clip's
``ClipLoss`` and a tiny text tower), ``vae`` (diffusers' ``AutoencoderKL``: reconstruction + KL) and ``unet``
(diffusers' ``UNet2DConditionModel``: DDPM noise prediction conditioned on the text tower's tokens). The
modules only see tensors and caption strings; ``lmm.towers`` feeds them the world's data and caches what
they produce.
"""
