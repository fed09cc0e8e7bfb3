"""Checks of a REC batch before it reaches the towers: types, ranks, batch sizes, devices and label ranges.

Each check raises a `TypeError` or `ValueError` that names the argument to fix.
"""

from __future__ import annotations

import torch
from torch import nn


def check_tensor(name: str, value: object, ndim: int, shape_doc: str) -> torch.Tensor:
    """`value` must be a tensor with `ndim` dimensions; `shape_doc` (e.g. `"(batch, tokens)"`) goes into the error."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor {shape_doc}, got {type(value).__name__}.")
    if value.dim() != ndim:
        raise ValueError(f"`{name}` must have shape {shape_doc}, got a tensor of shape {tuple(value.shape)}.")
    return value


def check_devices(tower: nn.Module, inputs: dict[str, torch.Tensor | None], kind: str) -> None:
    """Inputs must be on the device of the tower that reads them; a `ValueError` names the argument."""
    param = next(tower.parameters(), None)
    if param is None:
        return
    for name, tensor in inputs.items():
        if tensor is not None and tensor.device != param.device:
            raise ValueError(
                f"`{name}` is on {tensor.device} but the {kind} tower is on {param.device}; move the batch there "
                f"first (e.g. `{{k: v.to('{param.device}') for k, v in batch.items()}}`)."
            )


def validate_inputs(
    pixel_values: object,
    input_ids: object,
    attention_mask: object,
    pixel_mask: object,
    labels: object,
    max_text_tokens: int,
) -> None:
    """Check ranks, batch sizes and label ranges of a REC batch; raises `TypeError`/`ValueError` naming the argument."""
    batch = validate_vision_inputs(pixel_values, pixel_mask)
    text_batch = validate_text_inputs(input_ids, attention_mask, max_text_tokens)
    if text_batch != batch:
        raise ValueError(
            f"Batch sizes differ: `pixel_values` has {batch} images but `input_ids` has {text_batch} phrases."
        )
    if labels is not None:
        validate_labels(labels, batch)


def validate_vision_inputs(pixel_values: object, pixel_mask: object) -> int:
    """Check the vision tower's inputs (`pixel_values` `(batch, channels, height, width)`, optional `pixel_mask`
    `(batch, height, width)`); returns the batch size."""
    pixel_values = check_tensor("pixel_values", pixel_values, 4, "(batch, channels, height, width)")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"`pixel_values` must be floating point, normalised as the vision tower's image processor returns them, "
            f"got dtype {pixel_values.dtype} (raw pixels?)."
        )
    batch = pixel_values.shape[0]
    if batch == 0:
        raise ValueError("`pixel_values` holds no images (batch size 0): pass at least one image and phrase.")
    if pixel_mask is not None:
        pixel_mask = check_tensor("pixel_mask", pixel_mask, 3, "(batch, height, width)")
        if pixel_mask.shape != (batch, *pixel_values.shape[-2:]):
            raise ValueError(
                f"`pixel_mask` shape {tuple(pixel_mask.shape)} must be (batch, height, width) = "
                f"{(batch, *pixel_values.shape[-2:])}."
            )
    return batch


def validate_text_inputs(input_ids: object, attention_mask: object, max_text_tokens: int) -> int:
    """Check the text tower's inputs (`input_ids` `(batch, tokens)`, optional `attention_mask` of the same shape)
    against `max_text_tokens`; returns the batch size."""
    input_ids = check_tensor("input_ids", input_ids, 2, "(batch, tokens)")
    if input_ids.is_floating_point():
        raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
    if input_ids.shape[0] == 0:
        raise ValueError("`input_ids` holds no phrases (batch size 0): pass at least one image and phrase.")
    if input_ids.shape[1] == 0:
        raise ValueError("`input_ids` has no tokens: every phrase needs at least one (e.g. the tokenizer's [CLS]).")
    if input_ids.shape[1] > max_text_tokens:
        raise ValueError(
            f"`input_ids` has {input_ids.shape[1]} tokens but the adapter was built for at most {max_text_tokens} "
            "(`M2ISTConfig.max_text_tokens`); truncate the phrases when tokenizing."
        )
    if attention_mask is not None:
        attention_mask = check_tensor("attention_mask", attention_mask, 2, "(batch, tokens)")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} differs from `input_ids` shape "
                f"{tuple(input_ids.shape)}."
            )
    return input_ids.shape[0]


def check_finite_pixels(pixel_values: torch.Tensor) -> None:
    """`pixel_values` must hold no NaN or infinity (checked once they are known to be on the vision tower's device)."""
    if not torch.isfinite(pixel_values).all():
        raise ValueError(
            "`pixel_values` contains NaN or infinite values; check the image loading and normalisation (a division "
            "by a zero standard deviation?)."
        )


def text_vocab_size(text_tower: nn.Module) -> int | None:
    """How many token ids the text tower embeds: its input embedding's rows, else its config's `vocab_size`."""
    get_embeddings = getattr(text_tower, "get_input_embeddings", None)
    try:
        embeddings = get_embeddings() if callable(get_embeddings) else None
    except (AttributeError, NotImplementedError):
        embeddings = None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    size = getattr(getattr(text_tower, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def check_token_ids(input_ids: torch.Tensor, vocab_size: int | None) -> None:
    """Token ids must lie in `[0, vocab_size)` of the text tower; else a `ValueError` naming `input_ids` (instead of
    an index error deep inside the tower, or a device-side assert on CUDA)."""
    if input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0:
        raise ValueError(f"`input_ids` contains the negative token id {low}; token ids must be >= 0 (padding with "
                         "-100 is for labels, not inputs: pad with the tokenizer's pad token).")
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(
            f"`input_ids` contains the token id {high} but the text tower's vocabulary has {vocab_size} tokens "
            f"(ids 0-{vocab_size - 1}); tokenize with the text tower's own tokenizer."
        )


def validate_labels(labels: object, batch: int) -> None:
    """`labels` must be a float `(batch, 4)` tensor of `cxcywh` boxes in [0, 1] with width and height > 0."""
    if labels is not None:
        labels = check_tensor("labels", labels, 2, "(batch, 4) cxcywh")
        if labels.shape != (batch, 4):
            raise ValueError(f"`labels` must have shape (batch, 4) = {(batch, 4)} (cxcywh), got {tuple(labels.shape)}.")
        if not labels.is_floating_point():
            raise TypeError(f"`labels` must be a float tensor of cxcywh boxes, got dtype {labels.dtype}.")
        if not torch.isfinite(labels).all() or (labels < 0).any() or (labels > 1).any():
            raise ValueError("`labels` must be cxcywh boxes normalised to [0, 1]; found values outside [0, 1].")
        if (labels[:, 2:] <= 0).any():
            raise ValueError("`labels` must have width and height > 0 (cxcywh, normalised).")


def validate_image_size(pixel_values: torch.Tensor, image_size: int) -> None:
    """`pixel_values` `(batch, channels, S, S)` must have the `S = image_size` the adapter was built for."""
    if tuple(pixel_values.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"`pixel_values` are {tuple(pixel_values.shape[-2:])} but the adapter was built for "
            f"{image_size}x{image_size} images (`M2ISTConfig.image_size`); resize and pad to it."
        )
