"""The training batch: token rows plus the batch's images packed as uint8, and how both are made and used.

Dataloader workers only decode images to ``(H, W, 3)`` uint8 and tokenise (``lmm.preprocess.SampleEncoder``);
``collate`` right-pads the token rows and packs the images of the samples that have one into one flat uint8
buffer (``PackedImages``: one shared-memory block from a worker, one host-to-device copy). On the device,
``PackedImages.to_pixels`` unpacks them and runs the encoder's ``ImageTransform`` (resize, pad or crop,
normalise) on the accelerator: the whole image path of a training step is this file and
``encoders/transform.py``. Image and text-only samples share a batch; ``LMM.embed_inputs`` writes each
image's visual tokens into its ``<image>`` slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from encoders.transform import ImageTransform

#: Label of positions that carry no loss (prompt, image slots, padding), as transformers expects.
IGNORE_INDEX = -100


@dataclasses.dataclass
class PackedImages:
    """A batch's images, in sample order, as one flat uint8 buffer and their ``(H, W)`` sizes.

    The sizes are Python ints, so unpacking on the device needs no synchronisation.
    """

    data: Tensor
    sizes: list[tuple[int, int]]

    @classmethod
    def pack(cls, images: Sequence[Tensor]) -> PackedImages:
        flat = [image.reshape(-1) for image in images]
        out = None
        if get_worker_info() is not None:
            # As torch's default_collate does: build the batch in shared memory inside a worker, so handing
            # it to the main process does not copy every image a second time.
            storage = flat[0]._typed_storage()._new_shared(sum(f.numel() for f in flat))
            out = flat[0].new(storage)
        sizes = [(int(image.shape[0]), int(image.shape[1])) for image in images]
        return cls(torch.cat(flat, out=out), sizes)

    def unpack(self) -> list[Tensor]:
        """Views ``(H, W, 3)`` into ``data``, on whatever device it is."""
        counts = [height * width * 3 for height, width in self.sizes]
        if sum(counts) != self.data.numel():
            raise ValueError(
                f"packed images hold {self.data.numel()} bytes but their sizes {self.sizes} need {sum(counts)}"
            )
        return [part.view(h, w, 3) for part, (h, w) in zip(self.data.split(counts), self.sizes, strict=True)]

    def to_pixels(self, transform: ImageTransform) -> Tensor:
        """The encoder's normalised input ``(N, 3, S, S)`` float32, computed where ``data`` is."""
        return transform.batch(self.unpack())

    def pin_memory(self) -> PackedImages:
        return dataclasses.replace(self, data=self.data.pin_memory())

    def __len__(self) -> int:
        return len(self.sizes)


@dataclasses.dataclass
class TrainBatch:
    """Right-padded token rows with their labels and attention mask, and the images of the rows that have one."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    images: PackedImages | None = None

    def pin_memory(self) -> TrainBatch:
        return TrainBatch(
            self.input_ids.pin_memory(),
            self.labels.pin_memory(),
            self.attention_mask.pin_memory(),
            None if self.images is None else self.images.pin_memory(),
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(samples: Sequence[dict[str, Tensor]], pad_token_id: int) -> TrainBatch:
    """Right-pad encoded samples (``input_ids``, ``labels``, optional ``image``) into one ``TrainBatch``."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
        attention_mask[row, :n] = 1
    images = [s["image"] for s in samples if "image" in s]
    return TrainBatch(input_ids, labels, attention_mask, PackedImages.pack(images) if images else None)
