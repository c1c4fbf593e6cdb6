"""Where does a shapes-world run look when it writes a shape's kind, and when it writes where the shape is?

For every ground-truth shape of the first ``--limit`` validation images, two teacher-forced passes (the
held-out QA's chat template): the question "Where is the <colour> <kind>?" with its right answer "The <colour>
<kind> is <position>.", and the detailed-description prompt with the ground-truth description. In each, two
queries are read, as attend-and-segment reads a generated token's map (the query one position *before* the
token it writes): the one that writes the shape's kind word (at its colour word) and the one that writes its
position (at "is"). Each map is the query's attention to the image tokens minus the response's mean map
(``grounding.segment.normalize_maps``), over all layers and per layer; its peak (in the grid's centre span, the
default ``peak: centres``) lies on the named shape, on another shape, or on no shape. A last table splits the
greedy answers to the same questions by where the position-writing query's peak lay (all layers).

    python benchmarks/answer_attention.py runs/shapes-default [--limit 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from grounding.commands.models import load_model  # noqa: E402
from grounding.config import AttendConfig  # noqa: E402
from grounding.segment import argmax_point, normalize_maps  # noqa: E402
from grounding.teacher_forcing import teacher_forced_rows  # noqa: E402

PLACES = ("named", "other", "none")


def place_of_peak(
    full_map: torch.Tensor, within: tuple[slice, slice] | None, masks: list[np.ndarray], k: int
) -> str:
    """Whether ``full_map``'s peak (searched ``within``) lies on ``masks[k]`` (``named``), on another of
    ``masks`` (``other``) or on none (``none``)."""
    x, y = argmax_point(full_map, within)
    on = [j for j, mask in enumerate(masks) if mask[y, x]]
    return "named" if k in on else ("other" if on else "none")


def sentence_parts(caption: str) -> list[tuple[str, str, str]]:
    """ "A small red circle is top right. ..." -> [("A small red circle", "red circle", "top right"), ...]."""
    parts = []
    for sentence in caption.rstrip(".").split(". "):
        phrase, where = sentence.split(" is ", 1)
        parts.append((phrase, " ".join(phrase.split()[-2:]), where))
    return parts


def query_rows(tokenizer, response: str, heads: list[str]) -> list[tuple[int, int]]:
    """For each ``head`` (a prefix of ``response`` ending "<colour> <kind> is"): the response rows of the
    query that writes the kind (at the colour word) and of the one that writes the position (at "is").
    The shapes world's word-level tokenizer gives every word one token, so the colour is 3 tokens from the end."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    rows = []
    for head in heads:
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        if ids[: len(head_ids)] != head_ids:
            raise SystemExit(
                f"{head!r} does not tokenise as a prefix of {response!r}: not a word-level tokenizer"
            )
        rows.append((len(head_ids) - 3, len(head_ids) - 1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory (runs/<name>) of a shapes-world run")
    parser.add_argument("--limit", type=int, default=100, help="validation images (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model(argparse.Namespace(run=args.run, device="cpu"))
    model, root = loaded.model, Path(loaded.run_config.data.root) / "val"
    for name in ("gcg_captions.json", "gcg_masks.json"):
        if not (root / name).is_file():
            raise SystemExit(f"{root / name} not found: the run's world has no validation captions and masks")
    captions = json.loads((root / "gcg_captions.json").read_text())
    masks_by_image = defaultdict(list)
    for annotation in json.loads((root / "gcg_masks.json").read_text())["annotations"]:
        masks_by_image[annotation["image_id"]].append(
            mask_utils.decode(annotation["segmentation"]).astype(bool)
        )
    files = {image["id"]: image["file_name"] for image in captions["images"]}
    n_layers = model.language_model.config.num_hidden_layers
    settings = [("all", None)] + [(f"layer {i}", [i]) for i in range(n_layers)]
    describe = AttendConfig().prompt
    tally: dict[tuple[str, str], Counter] = defaultdict(Counter)
    answers: dict[str, Counter] = defaultdict(Counter)
    annotations = captions["annotations"][: args.limit or None]
    for annotation in annotations:
        with Image.open(root / "images" / files[annotation["image_id"]]) as image:
            image = image.convert("RGB")
        masks = masks_by_image[annotation["image_id"]]
        parts = sentence_parts(annotation["caption"])
        if len(parts) != len(masks):
            raise SystemExit(f"{annotation['image_id']}: {len(parts)} sentences but {len(masks)} masks")
        # (task, prompt, response, [(shape k, row writing the kind, row writing the position)])
        passes = []
        for k, (_, name, where) in enumerate(parts):
            answer = f"The {name} is {where}."
            ((kind_row, where_row),) = query_rows(model.tokenizer, answer, [f"The {name} is"])
            passes.append(("where", f"Where is the {name}?", answer, [(k, kind_row, where_row)]))
        said = [f"{phrase} is {where}." for phrase, _, where in parts]
        heads = [" ".join([*said[:k], f"{phrase} is"]) for k, (phrase, _, _) in enumerate(parts)]
        rows = query_rows(model.tokenizer, " ".join(said), heads)
        passes.append(("description", describe, " ".join(said), [(k, *r) for k, r in enumerate(rows)]))
        for task, prompt, response, rows_at in passes:
            batch = model.prepare([image], [prompt])  # one prompt, read under every layer setting
            ids = model.tokenizer(response, add_special_tokens=False)["input_ids"]
            places = {}
            for setting, layers in settings:
                ((rows, view),) = teacher_forced_rows(model, batch, [ids], layers)
                grids, within = view.to_grid(normalize_maps(rows)), view.peak_region("centres")
                for k, kind_row, where_row in rows_at:
                    for query, row in (("kind", kind_row), ("position", where_row)):
                        places[(setting, query)] = place_of_peak(view.render(grids[row]), within, masks, k)
                        tally[(f"{task}: the query writing the {query}", setting)][
                            places[(setting, query)]
                        ] += 1
            if task == "where":
                answer_key = places[("all", "position")]  # a "where" pass reads one shape
                generated = model.generate(batch, 12)[0]
                said_where = (
                    model.tokenizer.decode(generated, skip_special_tokens=True).rstrip(". ").split(" is ")[-1]
                )
                answers[answer_key][said_where.strip().lower() == response.rstrip(".").split(" is ")[-1]] += 1

    print(
        f"{args.run}: {len(annotations)} images; share of maps whose peak lies on the named shape (other shape)"
    )
    print()
    print("| query | " + " | ".join(name for name, _ in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for row_name in sorted({name for name, _ in tally}):
        cells = []
        for setting, _ in settings:
            counts = tally[(row_name, setting)]
            n = sum(counts.values())
            cells.append(f"{counts['named'] / n:.3f} ({counts['other'] / n:.3f})")
        print(f"| {row_name} | " + " | ".join(cells) + " |")
    print()
    print("| position-writing query's peak (all layers) | questions | greedy answer right |")
    print("|---|---|---|")
    for place, label in zip(PLACES, ("the asked shape", "another shape", "no shape"), strict=True):
        n = sum(answers[place].values())
        print(f"| {label} | {n} | {answers[place][True] / max(n, 1):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
