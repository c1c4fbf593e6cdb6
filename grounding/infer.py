"""Ground a folder of images in batches: ``python -m grounding.infer --run runs/<name> --images DIR --out PRED_DIR``.

Writes one GLaMM-format prediction per image, ``PRED_DIR/<image stem>.json`` = ``{image_id, caption,
phrases, pred_masks}``, which ``python -m grounding.evaluate gcg`` reads. Images whose prediction already
exists are skipped, so an interrupted run continues where it stopped. Unreadable images are reported and
skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from grounding.attend import write_predictions
from grounding.cli import add_model_arguments, load_groundable, pipeline_from_args
from grounding.coco_io import gcg_prediction_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if not args.images.is_dir():
        raise SystemExit(f"error: --images {args.images} is not a folder")
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    todo = [p for p in paths if not gcg_prediction_path(args.out, p.stem).is_file()]
    print(f"{len(paths)} images, {len(paths) - len(todo)} already done, {len(todo)} to ground")
    if not todo:
        return 0
    model = load_groundable(args.run, args.device)
    pipeline = pipeline_from_args(args, model, args.batch_size)
    bad = 0
    with tqdm(total=len(todo), desc="grounding", unit="img") as bar:
        for start in range(0, len(todo), args.batch_size):
            images, ids = [], []
            for path in todo[start : start + args.batch_size]:
                try:
                    with Image.open(path) as im:
                        images.append(im.convert("RGB"))
                    ids.append(path.stem)
                except (UnidentifiedImageError, OSError) as err:
                    bad += 1
                    log.warning("skipping unreadable image %s (%s)", path, err)
            if images:
                write_predictions(pipeline(images, args.prompt), ids, args.out)
            bar.update(len(todo[start : start + args.batch_size]))
    print(f"wrote predictions to {args.out}" + (f"; skipped {bad} unreadable images" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
