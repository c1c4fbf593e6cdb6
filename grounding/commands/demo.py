"""Ground one image: ``python -m grounding demo (--run RUN | --model NAME --weights DIR) --image PATH --out DIR``.

Writes ``DIR/result.json`` (caption, phrases, points, masks as COCO RLE, and the settings used) and
``DIR/overlay.png`` (the image with each phrase's mask, point and label, beside the per-phrase heat maps,
caption below). Unset attend-and-segment options take the run's own grounding settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from grounding.attend import AttendAndSegment
from grounding.coco_io import mask_to_rle
from grounding.commands.models import add_model_arguments, load_with_settings
from grounding.commands.options import add_attend_arguments
from grounding.overlay import draw_overlay


def open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image.convert("RGB")
    except FileNotFoundError:
        raise SystemExit(f"error: image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise SystemExit(f"error: {path} is not a readable image ({err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grounding demo", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    add_attend_arguments(
        parser, "the run's grounding settings, or the paper's for --model", exclude=("batch_size",)
    )
    args = parser.parse_args(argv)

    image = open_image(args.image)
    loaded, settings = load_with_settings(args)
    pipeline = AttendAndSegment(loaded.model, settings, device=args.device)
    result = pipeline([image])[0]
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "image": str(args.image),
        "prompt": settings.prompt,
        "caption": result.caption,
        "phrases": result.phrases,
        "points": [list(p) for p in result.points],
        "pred_masks": [mask_to_rle(m) for m in result.masks],
        "settings": dataclasses.asdict(settings),
        "model": loaded.source,
    }
    (args.out / "result.json").write_text(json.dumps(record, indent=1))
    overlay = draw_overlay(
        image,
        result.caption,
        result.phrases,
        result.points,
        result.masks,
        result.maps,
        view=result.view,
        image_maps=result.image_maps(settings.remove_corner) if result.shifted else None,
    )
    overlay.save(args.out / "overlay.png")
    print(f"caption: {result.caption}")
    for phrase, (x, y), mask in zip(result.phrases, result.points, result.masks, strict=True):
        print(f"  {phrase!r}: point ({x}, {y}), mask {int(mask.sum())} px")
    print(f"wrote {args.out / 'result.json'} and {args.out / 'overlay.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
