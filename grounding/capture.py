"""Attention capture for attend-and-segment: while a LLaVA-style model generates (or runs one teacher-forced
forward pass), record for every produced token the post-softmax attention from the query that produces it to
the image-token keys, averaged over all heads and all layers of the language model (DESIGN.md section 5,
step 2). The capture wraps the model's own attention implementation (SDPA or eager) through transformers'
``AttentionInterface`` instead of switching to eager + ``output_attentions=True``: the real attention still
runs in the fast kernel, and only the one needed query row per layer is recomputed, reduced over heads and
summed over layers on the fly, so memory grows with steps x image tokens and not layers x heads x seq^2.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = ["AttentionCapture", "ImagePositions", "find_language_model", "image_position_index"]


def find_language_model(model: nn.Module) -> PreTrainedModel:
    """Return the outermost transformers model inside ``model`` (or ``model`` itself) that can generate.

    A LLaVA model is itself generative, so its vision tower (a non-generative ``PreTrainedModel``) is never
    chosen; our LMM wraps a causal LM and possibly an HF vision model, and the causal LM is the one found.
    """
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.can_generate():
            return module
    raise ValueError(
        f"{type(model).__name__} contains no transformers model that can generate (a causal LM or a LLaVA model)"
    )


def _text_config_of(lm: PreTrainedModel):
    text_config = lm.config.get_text_config(decoder=True)
    # Older composite configs return a filtered copy; the attention modules must hold this exact object, or
    # switching its implementation would switch nothing.
    if not any(getattr(m, "config", None) is text_config for m in lm.modules()):
        raise ValueError(
            f"could not find the decoder config that {type(lm).__name__}'s attention layers use; "
            "pass a model whose get_text_config(decoder=True) is shared with its language model"
        )
    return text_config


def _module_eager_function(module: nn.Module) -> Callable:
    # "eager" is not in the global registry: every modeling file passes its own eager_attention_forward as
    # the default, so delegate to the one that lives next to the attention class.
    source = inspect.getmodule(type(module))
    fn = getattr(source, "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(
            f"{type(module).__name__} has no module-level eager_attention_forward to delegate to; "
            "use attn_implementation='sdpa' with AttentionCapture"
        )
    return fn


def select_layers(layers: Sequence[int], n_layers: int) -> frozenset[int]:
    """Decoder layer indices (negative ones from the end) -> a set of indices in ``[0, n_layers)``."""
    chosen = set()
    for layer in layers:
        if not -n_layers <= int(layer) < n_layers:
            raise ValueError(f"layer {layer} is out of range for a language model with {n_layers} layers")
        chosen.add(int(layer) % n_layers)
    if not chosen:
        raise ValueError("layers is empty: give at least one decoder layer, or None for all of them")
    return frozenset(chosen)


ImagePositions = tuple[int, int] | torch.Tensor | Sequence[int]


def image_position_index(image_positions: Sequence[ImagePositions]) -> list[torch.Tensor]:
    """Per sample, its image-token positions as a 1-D int64 CPU tensor.

    A ``tuple`` of two ints is the span form ``(start, end)`` (end exclusive); anything else (a 1-D integer
    tensor, a list, a range, an array) lists the positions themselves, in the order the map's columns take.
    """
    if len(image_positions) == 0:
        raise ValueError("image_positions is empty: give one entry per sample")
    out = []
    for b, entry in enumerate(image_positions):
        if isinstance(entry, tuple) and len(entry) == 2:
            start, end = int(entry[0]), int(entry[1])
            if not 0 <= start < end:
                raise ValueError(
                    f"image span {entry} of sample {b} is empty or negative: expected 0 <= start < end"
                )
            out.append(torch.arange(start, end))
            continue
        positions = torch.as_tensor(entry)
        if positions.ndim != 1 or positions.numel() == 0 or positions.dtype.is_floating_point:
            raise ValueError(
                f"image positions of sample {b} must be a non-empty 1-D integer sequence (or a (start, end) "
                f"tuple), got shape {tuple(positions.shape)} {positions.dtype}"
            )
        positions = positions.to(device="cpu", dtype=torch.long)
        if int(positions.min()) < 0:
            raise ValueError(f"image positions of sample {b} contain a negative position")
        out.append(positions)
    return out


class AttentionCapture:
    """Context manager that records image attention maps during ``generate`` or one teacher-forced forward.

    Usage (generation)::

        with AttentionCapture(model, image_positions) as cap:
            model.generate(...)            # inputs_embeds, or input_ids (+ pixel_values); sdpa or eager
        maps = cap.maps()                  # [(n_generated_tokens, len(image_positions[b])) float32 CPU]

    Usage (teacher forcing: prompt + a given response in one forward pass, no cache prefix)::

        with AttentionCapture(model, image_positions, response_start=r) as cap:
            model(input_ids=full_sequence, attention_mask=mask)
        maps = cap.maps()                  # [(seq_len - r_b, len(image_positions[b]))] per sample

    Row ``i`` of a sample's map is the post-softmax attention of the query that produces token ``i`` (the last
    prompt position for ``i = 0``, otherwise the position of token ``i - 1``) to that sample's image keys, in
    the order given, averaged over all heads of all language-model layers; it equals what eager
    ``output_attentions=True`` gives. Only the language model's layers count (a vision tower is excluded
    because only the decoder config is switched to the capture function).

    What the model's attention does is mirrored from what transformers hands the attention function: the 4D
    mask (padding, sliding windows, bidirectional image blocks), ``scaling``, ``softcap``, GQA, and RoPE or
    M-RoPE (already applied to the queries and keys). A sliding-window layer whose dynamic cache holds only the
    last keys gets the image keys that left its window as exact zeros, which is what its full-length eager
    row holds there. Attention sinks (``s_aux``) and a ``position_bias`` are refused with an error.

    Args:
        model: a transformers causal LM, or any module containing one (our LMM, a transformers VLM).
        image_positions: per sample, its image-token positions in the sequence given to the model (after left
            padding): a 1-D integer tensor or sequence, any count per sample, not necessarily contiguous; or
            the span form ``(start, end)`` (a tuple, end exclusive).
        response_start: teacher-forced mode. Position (int, or one per sample) of the first response token in
            the full sequence; the single forward pass inside the block yields one row per position from
            ``response_start`` to the end of the sequence (right padding included; trim it yourself).
        layers: average over these decoder layers only (indices into the language model's layers; negative
            ones count from the end). ``None``, the default and the reference's choice, averages all of them.
            Layers left out run their attention untouched and cost nothing extra.

    In batched generation a sample that has emitted EOS keeps producing padding; ``maps()`` returns every
    generated step for every sample and trimming to each sample's real length is the caller's job. Unsupported:
    beam search / ``num_return_sequences > 1`` (the batch no longer matches ``image_positions``), chunked
    prefill, a rolling static sliding-window cache; the model's attention must be ``sdpa`` or ``eager`` (other
    kernels work if their mask is 4D or absent). On exit the model's config and transformers' registries are
    restored as found.
    """

    def __init__(
        self,
        model: nn.Module,
        image_positions: Sequence[ImagePositions],
        response_start: int | Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
    ) -> None:
        positions = image_position_index(image_positions)
        self._positions = positions
        self._counts = [len(p) for p in positions]
        n_max = max(self._counts)
        first = positions[0]
        same = all(len(p) == len(first) and torch.equal(p, first) for p in positions)
        contiguous = bool((first[1:] - first[:-1]).eq(1).all())
        # The common case (every sample's image at the same contiguous place) is a slice, not a gather.
        self._shared_start = int(first[0]) if same and contiguous else None
        self._n_image = n_max
        # Padded (B, n_max) index; the padding repeats a real position and is cut off in maps().
        self._index_cpu = torch.stack([torch.cat([p, p[:1].expand(n_max - len(p))]) for p in positions])
        self._max_position = int(self._index_cpu.max())
        if response_start is None:
            self._response_starts: list[int] | None = None
        else:
            starts = (
                [int(response_start)] * len(positions)
                if isinstance(response_start, int)
                else list(response_start)
            )
            if len(starts) != len(positions) or min(starts) < 1:
                raise ValueError(f"response_start must be >= 1 and one per sample, got {response_start}")
            self._response_starts = starts
        self._lm = find_language_model(model)
        self._text_config = _text_config_of(self._lm)
        self._layers = None if layers is None else select_layers(layers, self._text_config.num_hidden_layers)
        self._name: str | None = None
        self._found_impl: str | None = None
        self._original_impl: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._passes: list[torch.Tensor] = []  # per pass: (B, rows, n_image), already divided by n_layers
        self._layer_counts: list[int] = []
        self._acc: torch.Tensor | None = None
        self._seen: set[int] = set()
        self._index: torch.Tensor | None = None
        self._seq_len = 0  # tokens the model has seen so far (prompt, then one more per generation step)

    # -- context manager ---------------------------------------------------------------------------------------

    def __enter__(self) -> AttentionCapture:
        if self._name is not None:
            raise RuntimeError("AttentionCapture is not re-entrant")
        self._reset()
        self._found_impl = self._text_config._attn_implementation
        # transformers treats an unset implementation as eager.
        original = self._found_impl if self._found_impl is not None else "eager"
        # Unique among live captures (the name is unregistered on exit), so nested captures or captures of
        # different models never clobber each other's registry entries.
        name = f"attend_and_segment_capture_{id(self):x}"
        # Resolve the original function per call (eager is per modeling file), but the mask function once: the
        # capture must see exactly the mask the original implementation would have received.
        self._original_impl = original
        AttentionInterface.register(name, self._attention)
        if original in AttentionMaskInterface._global_mapping:
            # Without a mask entry transformers hands the attention no mask at all (as it would have done for
            # an original implementation without one), so only mirror the entry when it exists.
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
        self._name = name
        # Set the private field, not the recursive property setter, so no sub-config is touched.
        self._text_config._attn_implementation_internal = name
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._text_config._attn_implementation_internal = self._found_impl
        AttentionInterface._global_mapping.pop(self._name, None)
        AttentionMaskInterface._global_mapping.pop(self._name, None)
        self._name = None
        self._finish_pass()

    # -- the registered attention function ---------------------------------------------------------------------

    def _delegate(self, module: nn.Module) -> Callable:
        if self._original_impl == "eager":
            return _module_eager_function(module)
        return ALL_ATTENTION_FUNCTIONS[self._original_impl]

    def _attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for unsupported in ("s_aux", "position_bias"):
            if kwargs.get(unsupported) is not None:
                # Refuse rather than return maps that differ from the model's real attention.
                raise NotImplementedError(
                    f"{type(module).__name__} passes {unsupported} to its attention, which AttentionCapture "
                    "does not mirror"
                )
        out = self._delegate(module)(module, query, key, value, attention_mask, *args, **kwargs)
        if self._layers is not None:
            index = getattr(module, "layer_idx", None)
            if index is None:
                raise ValueError(
                    f"{type(module).__name__} has no layer_idx, so AttentionCapture cannot select layers"
                )
            if index not in self._layers:
                return out
        with torch.no_grad():
            self._record(module, query, key, attention_mask, kwargs)
        return out

    def _image_index(self, device: torch.device) -> torch.Tensor:
        if self._index is None or self._index.device != device:
            self._index = self._index_cpu.to(device)
        return self._index

    def _record(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> None:
        if id(module) in self._seen:
            # The same layer again means a new forward pass (the next generation step) has started.
            self._finish_pass()
        batch, n_heads, q_len, head_dim = query.shape
        if not self._seen:
            self._seq_len += q_len
        self._seen.add(id(module))

        if batch != len(self._positions):
            raise ValueError(
                f"the model runs a batch of {batch} but {len(self._positions)} image spans (position sets) were given "
                "(beam search and num_return_sequences > 1 are not supported)"
            )
        if self._response_starts is None:
            first_row, stop_row = q_len - 1, q_len
        else:
            if self._passes:
                raise RuntimeError("teacher-forced AttentionCapture expects exactly one forward pass")
            # The last position's query would produce a token beyond the given sequence: no row for it.
            first_row, stop_row = min(self._response_starts) - 1, q_len - 1
            if first_row >= stop_row:
                raise ValueError(
                    f"response_start {first_row + 1} leaves no response token in {q_len} positions"
                )
        rows = stop_row - first_row

        kv_len = key.shape[2]
        if attention_mask is None and q_len > 1 and kv_len > q_len:
            # Mirrors sdpa_attention_forward: an empty static cache in prefill holds unused key slots.
            key = key[:, :, :q_len]
            kv_len = q_len
        # A dynamic sliding-window cache hands over only the last keys: key j is then sequence position
        # key_offset + j. A full cache (kv_len == seq_len) or a static one (kv_len > seq_len) starts at 0.
        key_offset = max(self._seq_len - kv_len, 0)
        if self._max_position >= self._seq_len:
            raise ValueError(
                f"image position {self._max_position} is beyond the {self._seq_len} positions the model sees"
            )

        n_kv = key.shape[1]
        rep = n_heads // n_kv
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = head_dim**-0.5
        # Group the query heads by their KV head instead of repeating K (as repeat_kv does): query head h uses
        # KV head h // rep, which is exactly the (n_kv, rep) split of the head axis. Scaling the few query
        # rows instead of the scores saves a pass over a (heads x keys) tensor.
        q = (query[:, :, first_row:stop_row] * scaling).reshape(batch, n_kv, rep * rows, head_dim)
        # Matmul in the model's dtype (as eager does; upcasting K would copy the whole cache), then softmax
        # in float32 like eager's.
        scores = torch.matmul(q, key.transpose(-1, -2)).view(batch, n_heads, rows, kv_len).float()
        softcap = kwargs.get("softcap")
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap

        if attention_mask is not None:
            if attention_mask.ndim == 2:  # a key padding mask (flash-attention style)
                mask = attention_mask[:, None, None, key_offset : key_offset + kv_len].bool()
            else:
                mask = attention_mask[:, :, first_row:stop_row, :kv_len]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
        elif kwargs.get("is_causal", getattr(module, "is_causal", True)) and q_len > 1:
            # No mask means plain causal attention, aligned bottom-right as in the KV cache.
            offset = kv_len - q_len
            query_pos = torch.arange(first_row, stop_row, device=scores.device)[:, None] + offset
            allowed = torch.arange(kv_len, device=scores.device)[None, :] <= query_pos
            scores = scores.masked_fill(~allowed, float("-inf"))

        # Mean over heads before picking the image keys: one cheap reduction, then a slice (or, with
        # per-sample positions, a gather) of a (batch, rows, keys) tensor instead of a (batch, heads, ...) one.
        head_mean = scores.softmax(dim=-1).mean(dim=1)
        is_view = self._shared_start is not None and key_offset == 0
        if is_view:
            image = head_mean[..., self._shared_start : self._shared_start + self._n_image]
        else:
            index = self._image_index(head_mean.device)
            if key_offset == 0:
                image = head_mean.gather(-1, index[:, None, :].expand(batch, rows, self._n_image))
            else:
                index = index - key_offset
                inside = index >= 0  # keys that left a sliding window: exactly zero attention
                shifted = index.clamp(min=0)[:, None, :].expand(batch, rows, self._n_image)
                image = head_mean.gather(-1, shifted) * inside[:, None, :]
        if self._acc is None:
            # A slice would keep the whole (batch, rows, keys) tensor alive: copy it.
            self._acc = image.clone() if is_view else image
        else:
            self._acc.add_(image)

    def _finish_pass(self) -> None:
        if self._acc is not None:
            self._passes.append(self._acc / len(self._seen))
            self._layer_counts.append(len(self._seen))
        self._acc = None
        self._seen = set()

    # -- results -----------------------------------------------------------------------------------------------

    def maps(self) -> list[torch.Tensor]:
        """Per sample, a ``(n_rows, len(image_positions[b]))`` float32 CPU tensor (see the class docstring).

        Rows are every generation step, including the padding steps after a sample's EOS in batched
        generation; trim them to each sample's real length yourself.
        """
        self._finish_pass()
        if not self._passes:
            raise RuntimeError("no attention was captured: run generate() or a forward pass inside the block")
        if len(set(self._layer_counts)) != 1:
            raise RuntimeError(f"forward passes saw different numbers of layers: {self._layer_counts}")
        if self._response_starts is not None and len(self._passes) != 1:
            raise RuntimeError(f"teacher-forced capture expects one forward pass, saw {len(self._passes)}")
        stacked = torch.cat(self._passes, dim=1).float().cpu()
        per_sample = [stacked[b, :, :n] for b, n in enumerate(self._counts)]
        if self._response_starts is None:
            return per_sample
        lowest = min(self._response_starts)
        return [m[start - lowest :] for m, start in zip(per_sample, self._response_starts, strict=True)]
