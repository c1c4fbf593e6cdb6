"""Ground a folder of images in batches: ``python -m grounding infer (--run RUN | --model ...) --images DIR --out
PRED_DIR``.

Writes one GLaMM-format prediction per image, ``PRED_DIR/<image stem>.json`` = ``{image_id, caption,
phrases, pred_masks}`` (each written atomically), which ``python -m grounding evaluate gcg`` reads. Images
whose prediction already exists are skipped, so an interrupted run continues where it stopped; a folder whose
predictions were made with other settings is refused (``PRED_DIR/settings.json``). Unreadable images are
reported and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from grounding.attend import AttendAndSegment
from grounding.coco_io import gcg_prediction_path, write_gcg_prediction
from grounding.commands.models import add_model_arguments, load_with_settings
from grounding.commands.options import add_attend_arguments
from grounding.commands.settings_file import SettingsMismatch, check_settings
from grounding.config import ADDED_SETTINGS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grounding infer", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    add_attend_arguments(parser, "the run's grounding settings, or the paper's for --model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if not args.images.is_dir():
        raise SystemExit(f"error: --images {args.images} is not a folder")
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    todo = [p for p in paths if not gcg_prediction_path(args.out, p.stem).is_file()]
    print(f"{len(paths)} images, {len(paths) - len(todo)} already done, {len(todo)} to ground")
    if not todo:
        return 0
    loaded, settings = load_with_settings(args)
    try:
        check_settings(
            args.out,
            {"model": loaded.source, **dataclasses.asdict(settings)},
            ignore=("batch_size",),
            absent_means=ADDED_SETTINGS,
        )
    except SettingsMismatch as err:
        raise SystemExit(f"error: {err}") from None
    pipeline = AttendAndSegment(loaded.model, settings, device=args.device)
    bad = 0
    step = settings.batch_size
    with tqdm(total=len(todo), desc="grounding", unit="img") as bar:
        for start in range(0, len(todo), step):
            images, ids = [], []
            for path in todo[start : start + step]:
                try:
                    with Image.open(path) as im:
                        images.append(im.convert("RGB"))
                    ids.append(path.stem)
                except (UnidentifiedImageError, OSError) as err:
                    bad += 1
                    log.warning("skipping unreadable image %s (%s)", path, err)
            for image_id, result in zip(ids, pipeline(images) if images else [], strict=True):
                write_gcg_prediction(gcg_prediction_path(args.out, image_id), result.to_gcg(image_id))
            bar.update(len(todo[start : start + step]))
    print(f"wrote predictions to {args.out}" + (f"; skipped {bad} unreadable images" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
