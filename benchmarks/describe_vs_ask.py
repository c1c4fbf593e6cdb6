"""Does a shapes-world run know where a shape is when it names it itself, and when a question names it?

For every validation image (``val/gcg_captions.json`` of the run's world) the run's model writes the detailed
description (the grounding prompt, greedy, 48 new tokens), and is asked "Where is the <colour> <kind>?" about
every ground-truth shape (the held-out QA's wording and chat template). The table: of the shapes the
description names (colour and kind), how often it puts them in the right 3x3 cell; of all shapes, how often the
question's answer does; and, for the shapes the description places right, how often the answer does too.

    python benchmarks/describe_vs_ask.py runs/shapes-default [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.templates import get_template  # noqa: E402
from grounding.config import AttendConfig  # noqa: E402
from lmm.run_dir import load_run  # noqa: E402

#: "A small red circle is top right." -> ("red", "circle", "top right"); sizes are optional.
SENTENCE = re.compile(r"an? (?:small |large )?(\w+) (\w+) is ([a-z ]+?)\.")


def cells(text: str) -> dict[tuple[str, str], str]:
    """(colour, kind) -> position for each sentence of a description (the last one wins on repeats)."""
    return {(colour, kind): where for colour, kind, where in SENTENCE.findall(text.lower())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory (runs/<name>) of a shapes-world run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, config = load_run(args.run)
    root = Path(config.data.root)
    captions_file = root / "val" / "gcg_captions.json"
    if not captions_file.is_file():
        raise SystemExit(f"{captions_file} not found: the run's world has no validation captions")
    captions = json.loads(captions_file.read_text())
    files = {image["id"]: image["file_name"] for image in captions["images"]}
    chat = get_template(config.qa_eval.template)
    transform = model.encoder.image_transform(config.qa_eval.aspect)
    prompt = chat.prompt(AttendConfig().prompt, has_image=True)

    described = described_right = asked = asked_right = both_right = 0
    annotations = captions["annotations"]
    for start in range(0, len(annotations), args.batch_size):
        chunk = annotations[start : start + args.batch_size]
        images = [
            transform(Image.open(root / "val" / "images" / files[a["image_id"]]).convert("RGB"))
            for a in chunk
        ]
        descriptions = model.generate([prompt] * len(chunk), images, max_new_tokens=48)
        questions, question_images, keys = [], [], []
        for annotation, description, image in zip(chunk, descriptions, images, strict=True):
            said = cells(description)
            for (colour, kind), where in cells(annotation["caption"]).items():
                questions.append(chat.prompt(f"Where is the {colour} {kind}?", has_image=True))
                question_images.append(image)
                keys.append((where, said.get((colour, kind))))
        answers = model.generate(questions, question_images, max_new_tokens=12)
        for (where, said_where), answer in zip(keys, answers, strict=True):
            answered = answer.lower().rstrip(". ").split(" is ")[-1].strip()
            asked += 1
            asked_right += answered == where
            if said_where is not None:
                described += 1
                described_right += said_where == where
                both_right += said_where == where and answered == where
    print(f"| {args.run} | shapes | right cell |")
    print("|---|---|---|")
    print(f"| named in the description | {described} | {described_right / max(described, 1):.3f} |")
    print(f"| asked about (every shape) | {asked} | {asked_right / max(asked, 1):.3f} |")
    print(
        f"| asked, of those the description placed right | {described_right} | "
        f"{both_right / max(described_right, 1):.3f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
