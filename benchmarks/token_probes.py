"""Where a trained shapes-world run keeps or loses what it sees: linear probes on an object's visual tokens.

For fresh scenes of the run's own world (never trained on), each shape's feature at a level is the mean of
the visual tokens under its mask (weighted by how much of each token's cell the mask covers), at: the tower's
output (what the projector reads), the projector's output (the LLM's input) and each LLM layer's output at the
image positions (prompt: the detailed-description question). A multinomial logistic regression per level and
attribute is fitted on 70% of the shapes and scored on the rest. Attributes: the 3x3 cell (chance 1/9), the
kind, the colour and the size. A level that scores high has the attribute linearly in the tokens; a drop from
one level to the next says where it is lost. One more level, "tower, 3x3 window", concatenates the tower's
3 x 3 tokens around the object's heaviest token instead of averaging them: what the arrangement of its tokens
adds to their mean.

    python benchmarks/token_probes.py runs/shapes-default [--scenes 600] [--threads 2]

``--tower`` judges a tower alone, in a minute instead of an LMM run: the config (configs/default.yaml plus the
``key=value`` overrides given) has its world generated and its tower trained or taken from the cache, and only
the tower's output is probed.

    python benchmarks/token_probes.py --tower encoder.pretrain.steps=1200
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.config import ShapesWorldConfig  # noqa: E402
from datamodules.shapes import DETAIL_PROMPT, load_world_summary, render_scene  # noqa: E402
from grounding.layout import pad_box  # noqa: E402
from lmm.chat_runner import ChatRunner  # noqa: E402
from lmm.run_dir import load_run  # noqa: E402

ATTRIBUTES = ("cell", "kind", "colour", "size")
#: The level that keeps the arrangement of the tower's tokens around an object (``window_feature``).
WINDOW_LEVEL = "tower, 3x3 window"
#: Scene indices of the probe set, past any validation split's.
FIRST_INDEX = 100_000


def token_weights(mask: np.ndarray, image_size: tuple[int, int], side: int) -> np.ndarray:
    """A (W x H) image's shape mask -> per-token weights on the ``side x side`` grid of its padded square
    (LLaVA's pad: the image centred on a max(W, H) square): the mask's area share of each token's cell (box
    averaging, so cells need not be whole pixels), normalised to sum to 1."""
    width, height = image_size
    left, top, right, _ = (int(v) for v in pad_box(height, width))  # the square, in the image's pixels
    canvas = np.zeros((right - left, right - left), np.float32)
    canvas[-top : -top + height, -left : -left + width] = mask
    cover = np.asarray(Image.fromarray(canvas).resize((side, side), Image.Resampling.BOX), np.float64)
    cover = cover.reshape(-1)
    if cover.sum() <= 0:
        raise ValueError("the mask is empty: no token to weight")
    return cover / cover.sum()


def window_feature(tokens: torch.Tensor, weights: np.ndarray, side: int, radius: int = 1) -> np.ndarray:
    """The ``(2 radius + 1)^2`` tokens around an object's heaviest token, concatenated in row-major order (zeros
    past the grid's edge): unlike the mean, it keeps how the object's tokens are arranged."""
    grid = tokens.reshape(side, side, -1)
    row, col = divmod(int(np.argmax(weights)), side)
    padded = torch.nn.functional.pad(grid.permute(2, 0, 1), (radius,) * 4).permute(1, 2, 0)
    return padded[row : row + 2 * radius + 1, col : col + 2 * radius + 1].reshape(-1).numpy()


def probe_accuracy(
    features: np.ndarray, labels: list, train_fraction: float = 0.7, l2: float = 1e-3
) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised features, L-BFGS)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    x = torch.tensor(features, dtype=torch.float64)
    n_train = int(len(y) * train_fraction)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x[:n_train] @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, y[:n_train]) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (x[n_train:] @ weight + bias).argmax(1)
    return float((predicted == y[n_train:]).double().mean())


def tower_model(overrides: list[str]) -> tuple[Any, Any]:
    """The default config with ``overrides``: its world generated and its tower trained (or reused from the
    cache) if missing; the model built around that tower, with a random projector and LLM."""
    from datamodules.shapes import ensure_world
    from lmm.build import build_model
    from lmm.config_loading import load_config
    from lmm.towers import ensure_towers

    config = load_config(None, overrides)
    if config.data.shapes is not None:
        ensure_world(config.data.shapes, Path(config.data.root))
    config, _ = ensure_towers(config)
    return build_model(config, None).eval(), config


def _llm_levels(model: Any, batch: Any) -> dict[str, torch.Tensor]:
    """Each LLM layer's output at the image positions of ``batch``."""
    embeds = model.embed_inputs(batch.input_ids, batch.images)
    out = model.llm.model(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, output_hidden_states=True, use_cache=False
    )
    return {
        f"llm layer {layer}": torch.stack([hidden[j, s:e] for j, (s, e) in enumerate(batch.image_spans)])
        for layer, hidden in enumerate(out.hidden_states[1:], 1)
    }


@torch.no_grad()
def object_features(
    model: Any, config: Any, n_scenes: int, batch_size: int = 16, tower_only: bool = False
) -> tuple[dict, dict]:
    """{level: (n_shapes, d) array} and {attribute: labels} over ``n_scenes`` fresh scenes of the model's world
    (``config.data.root``); ``tower_only``: the tower's output alone."""
    summary = load_world_summary(config.data.root)
    if summary is None:
        raise FileNotFoundError(f"{config.data.root} holds no complete shapes world (world.json)")
    world = ShapesWorldConfig.from_dict(summary["config"])
    stage = config.stages[config.run_stages[-1]]
    runner = ChatRunner(model, stage.template, "pad")
    side = int(round(model.encoder.num_tokens**0.5))
    features: dict[str, list] = {}
    labels: dict[str, list] = {a: [] for a in ATTRIBUTES}
    for start in range(0, n_scenes, batch_size):
        scenes = [
            render_scene(world.seed, world, split="val", index=FIRST_INDEX + i)
            for i in range(start, min(n_scenes, start + batch_size))
        ]
        batch = runner.batch([runner.prompt(DETAIL_PROMPT, True)] * len(scenes), [s.image for s in scenes])
        tower = model.encoder(batch.images)
        levels = {"tower": tower}
        if not tower_only:
            levels.update(projector=model.projector(tower), **_llm_levels(model, batch))
        for j, scene in enumerate(scenes):
            for shape in scene.shapes:
                weights = torch.tensor(token_weights(shape.mask, scene.image.size, side), dtype=torch.float32)
                for name, tokens in levels.items():
                    features.setdefault(name, []).append(
                        (weights[:, None] * tokens[j].float()).sum(0).numpy()
                    )
                features.setdefault(WINDOW_LEVEL, []).append(
                    window_feature(tower[j].float(), weights.numpy(), side)
                )
                for attribute in ATTRIBUTES:
                    labels[attribute].append(getattr(shape, attribute))
    return {k: np.stack(v) for k, v in features.items()}, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="*", help="a run directory, or with --tower: key=value overrides")
    parser.add_argument("--tower", action="store_true", help="probe the configured tower alone")
    parser.add_argument("--scenes", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tower:
        model, config = tower_model(args.source)
        name = "tower of configs/default.yaml " + " ".join(args.source)
    else:
        if len(args.source) != 1:
            parser.error("give one run directory (or --tower with key=value overrides)")
        model, config = load_run(args.source[0])
        name = args.source[0]
    features, labels = object_features(model, config, args.scenes, tower_only=args.tower)
    n = len(labels["cell"])
    print(f"{name}: {n} shapes from {args.scenes} scenes, 70/30 split; held-out probe accuracy\n")
    print("| level | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|" + "---|" * len(ATTRIBUTES))
    for level, x in features.items():
        scores = [probe_accuracy(x, labels[a]) for a in ATTRIBUTES]
        print(f"| {level} | " + " | ".join(f"{s:.2f}" for s in scores) + " |")
    chance = [max(labels[a].count(v) for v in set(labels[a])) / n for a in ATTRIBUTES]
    print("| majority class | " + " | ".join(f"{c:.2f}" for c in chance) + " |")


if __name__ == "__main__":
    main()
