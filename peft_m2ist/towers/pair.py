"""`VisionTextPair`: a minimal container holding any vision model and any text model for `get_peft_model`."""

from __future__ import annotations

from torch import nn


class VisionTextPair(nn.Module):
    """Holds a vision tower (`vision_model`) and a text tower (`text_model`); it has no forward of its own.

    Use it when the towers do not come in a dual-encoder container (`VisionTextDualEncoderModel`, `CLIPModel`).
    The M2IST tuner runs each tower itself.
    """

    def __init__(self, vision_model: nn.Module, text_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.text_model = text_model
        names = [getattr(getattr(m, "config", None), "_name_or_path", "") for m in (vision_model, text_model)]
        self.name_or_path = " + ".join(n for n in names if n) or None

    # transformers' Trainer reads the container's forward signature (which dataset columns to keep, `labels` as the
    # label name) and `accepts_loss_kwargs` (M2IST's loss is a batch mean: scale it under gradient accumulation)
    accepts_loss_kwargs = False

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, pixel_mask=None, labels=None):
        """Not callable: the arguments are those of the M2IST model that wraps the pair, which runs the towers."""
        raise TypeError(
            "VisionTextPair has no forward of its own: wrap it with `get_peft_model(pair, M2ISTConfig(...))`."
        )
