"""The REC `PeftModel` subclass that `get_peft_model` returns for `M2ISTConfig` (task type REC)."""

from __future__ import annotations

import torch
from peft import PeftModel

from .model import ReferringExpressionOutput


class PeftModelForReferringExpressionComprehension(PeftModel):
    """A `PeftModel` whose forward maps an image and a phrase to the box of the object the phrase names.

    Forward: `(pixel_values, input_ids, attention_mask, pixel_mask=None, labels=None)` ->
    `ReferringExpressionOutput` with `pred_boxes` (`cxcywh`, normalised to [0, 1]) and, with `labels`, the loss and
    its parts. The towers run frozen, in eval mode and under `torch.no_grad()`, also in training.
    """

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> ReferringExpressionOutput:
        with self._enable_peft_forward_hooks(**kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.base_model(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_mask=pixel_mask,
                labels=labels,
                **kwargs,
            )

    def get_parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Counts for one adapter: `adapter_only` (the M3ISA experts: the paper's 'tunable parameters'),
        `projections_and_head`, `adapter_and_head` (everything trainable), `towers` and `total`."""
        return self.base_model.parameter_counts(adapter_name)

    def print_parameter_counts(self, adapter_name: str | None = None) -> None:
        counts = self.get_parameter_counts(adapter_name)
        total = counts["total"]
        print(
            f"adapter-only params: {counts['adapter_only']:,} ({100 * counts['adapter_only'] / total:.2f}%) || "
            f"adapter + head params: {counts['adapter_and_head']:,} ({100 * counts['adapter_and_head'] / total:.2f}%)"
            f" || all params: {total:,}"
        )
