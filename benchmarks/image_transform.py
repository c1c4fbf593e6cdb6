"""Cost of the image transform the training step runs on the device (``LMM.encoder_pixels``).

Workers hand over decoded uint8 images at their own size; the transform (pad or crop to a square, antialiased
bicubic resize to the encoder's size, normalise) runs wherever the batch lives. This times
``ImageTransform.batch`` on a batch of COCO-size images (mixed 640x480 and 480x640, as in LLaVA's data), on
the CPU and, when there is one, on the GPU, and prints one table:

    python benchmarks/image_transform.py [--batch 16] [--size 336] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from encoders.transform import CLIP_MEAN, CLIP_STD, ImageTransform  # noqa: E402


def time_batch(transform: ImageTransform, images: list[torch.Tensor], repeats: int) -> float:
    """Median milliseconds of one ``transform.batch`` call (the GPU synchronised around each)."""
    cuda = images[0].is_cuda
    transform.batch(images)  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        transform.batch(images)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in a training process whose cores feed the dataloader workers
    generator = torch.Generator().manual_seed(0)
    shapes = [(480, 640) if i % 3 else (640, 480) for i in range(args.batch)]
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator) for h, w in shapes]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"batch of {args.batch} COCO-size uint8 images -> (B, 3, {args.size}, {args.size}) float32")
    print(f"| {'device':<28} | {'aspect':<6} | {'ms / batch':>10} | {'ms / image':>10} |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 12}|{'-' * 12}|")
    for device in devices:
        on_device = [image.to(device) for image in images]
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu (1 thread)"
        for aspect in ("pad", "crop"):
            transform = ImageTransform(args.size, CLIP_MEAN, CLIP_STD, aspect)
            ms = time_batch(transform, on_device, args.repeats)
            print(f"| {name[:28]:<28} | {aspect:<6} | {ms:>10.2f} | {ms / args.batch:>10.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
