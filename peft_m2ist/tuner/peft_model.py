"""The REC `PeftModel` subclass that `get_peft_model` returns for `M2ISTConfig` (task type REC)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from ..model_card import build_model_card, check_model_card_info, read_model_card_info, write_model_card_info
from ..modeling.outputs import ReferringExpressionOutput
from ..towers.features import TowerFeatures
from .adapter_keys import AdapterWeightsError


class PeftModelForReferringExpressionComprehension(PeftModel):
    """A `PeftModel` whose forward maps an image and a phrase to the box of the object the phrase names.

    Forward: `(pixel_values, input_ids, attention_mask, pixel_mask=None, labels=None)` ->
    `ReferringExpressionOutput` with `pred_boxes` (`cxcywh`, normalised to [0, 1]) and, with `labels`, the loss and
    its parts. The towers run frozen, in eval mode and under `torch.no_grad()`, also in training. In eval mode,
    `adapter_names=[...]` (one adapter name per row, peft's convention for LoRA's mixed batches) runs the towers once
    and each row through its own adapter (`peft_m2ist.tuner.mixed_batch`).
    """

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        tower_features: TowerFeatures | dict[str, torch.Tensor] | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs,
    ) -> ReferringExpressionOutput:
        # `adapter_names` goes to the tuner itself (peft's `PeftModel` would drop it: M2IST has no forward hooks)
        with self._enable_peft_forward_hooks(**kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.base_model(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_mask=pixel_mask,
                labels=labels,
                tower_features=tower_features,
                adapter_names=adapter_names,
                **kwargs,
            )

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter by name (a list of one name is accepted too). M2IST predicts with one adapter at a
        time, so a list of several names raises a `ValueError`, as `M2ISTModel.set_adapter` does."""
        if not isinstance(adapter_name, str):
            names = list(adapter_name)
            if len(names) != 1:
                raise ValueError(f"M2IST predicts with one adapter at a time; got {names}.")
            adapter_name = names[0]
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any):
        """peft's `load_adapter`, all or nothing: the saved tensors must be exactly the adapter's side network and head
        (names and shapes), else a `ValueError` naming the keys and the file, raised before any weight changes. A
        failed load leaves the model as it was: an adapter this call added is removed again (taps, side network,
        head, config), and so is one built from a saved config whose weights never loaded (what
        `PeftModel.from_pretrained` builds), which leaves the container without taps."""
        tuner = self.base_model
        added = adapter_name not in self.peft_config
        requires_grad = {name: p.requires_grad for name, p in self.named_parameters()}
        try:
            result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
        except Exception as err:
            if adapter_name in self.peft_config and (added or adapter_name in tuner._m2ist_awaiting_weights):
                self._discard_adapter(adapter_name)
                for name, param in self.named_parameters():
                    if name in requires_grad:
                        param.requires_grad_(requires_grad[name])
            if isinstance(err, AdapterWeightsError):
                raise AdapterWeightsError(f"{_weights_file(model_id, kwargs)}: {err}") from None
            raise
        tuner._m2ist_awaiting_weights.discard(adapter_name)
        tuner.move_adapter_to_tower_device(adapter_name)
        if self.model_card_info is None:
            info = read_model_card_info(model_id, kwargs.get("subfolder"))
            if info:
                self.model_card_info = info
        return result

    def _discard_adapter(self, adapter_name: str) -> None:
        """Remove a half-made adapter; the last one takes the taps and peft's bookkeeping off the container too."""
        if len(self.peft_config) > 1:
            self.delete_adapter(adapter_name)  # not the active one: the active adapter stays as it is
            return
        del self.peft_config[adapter_name]
        self.base_model.unload()

    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        model_card_info: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """peft's `save_pretrained`, with the M2IST model card (`peft_m2ist.model_card`).

        `model_card_info` (`training_data`, `training_command`, `evaluation`) fills the card's training and
        evaluation sections for this save; `model.model_card_info = {...}` does so for every later save and
        `push_to_hub`. No tower weight is saved: `save_embedding_layers` is `False` ("auto" would ask the Hub for a
        config at the container's name, a name of two towers); `True` raises a `ValueError`.
        """
        if save_embedding_layers is True:
            raise ValueError("M2IST never saves tower weights: the towers are frozen and loaded separately, so "
                             "`save_embedding_layers=True` is not supported.")
        info = check_model_card_info(self.model_card_info if model_card_info is None else model_card_info)
        previous = self.__dict__.get("_m2ist_card_info_for_save")
        self.__dict__["_m2ist_card_info_for_save"] = info
        try:
            super().save_pretrained(
                save_directory,
                safe_serialization=safe_serialization,
                selected_adapters=selected_adapters,
                save_embedding_layers=False,
                is_main_process=is_main_process,
                path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
                **kwargs,
            )
        finally:
            self.__dict__["_m2ist_card_info_for_save"] = previous
        if is_main_process:
            write_model_card_info(save_directory, info)

    @property
    def model_card_info(self) -> dict[str, Any] | None:
        """Training data, command and evaluation for the model card (see `peft_m2ist.model_card`); `None` if unset.
        Read back from a local adapter folder by `load_adapter` / `PeftModel.from_pretrained`."""
        return self.__dict__.get("_m2ist_model_card_info")

    @model_card_info.setter
    def model_card_info(self, info: Mapping[str, Any] | None) -> None:
        self.__dict__["_m2ist_model_card_info"] = check_model_card_info(info) if info is not None else None

    def tower_names(self) -> list[str]:
        """The `name_or_path` of each tower, where its config knows one."""
        adapter = self.active_adapter
        config = self.peft_config[adapter]
        names = []
        for path in (config.vision_tower, config.text_tower):
            tower_config = getattr(self.base_model.model.get_submodule(path), "config", None)
            name = getattr(tower_config, "_name_or_path", "") or ""
            if name:
                names.append(name)
        return names

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write the M2IST model card (`peft_m2ist.model_card.build_model_card`) to `output_dir/README.md`, in place
        of peft's template; peft calls this from `save_pretrained` (and so from `push_to_hub`)."""
        info = self.__dict__.get("_m2ist_card_info_for_save")
        if info is None:
            info = self.model_card_info or {}
        card = build_model_card(self, info)
        card.save(Path(output_dir) / "README.md")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        model_card_info: Mapping[str, Any] | None = None,
        **save_kwargs: Any,
    ) -> Any:
        """Save the adapter as `save_pretrained` does (its M2IST card, and the towers it was built on in
        `adapter_config.json`'s `base_towers`) and upload that folder to the Hub repository `repo_id`, created if
        missing. Returns the Hub client's `CommitInfo`.

        transformers' `push_to_hub`, which peft's `PeftModel` inherits, replaces the saved `README.md` with the
        repository's existing card or a generic template; this one uploads the M2IST card as saved.
        """
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, model_card_info=model_card_info, **save_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=revision,
                                     commit_message=commit_message or "Upload M2IST adapter",
                                     commit_description=commit_description, create_pr=create_pr)

    def encode_towers(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> TowerFeatures:
        """The frozen towers' outputs the side network reads (with `adapter_names`, the union of those adapters'
        taps); see `M2ISTModel.encode_towers`."""
        return self.base_model.encode_towers(pixel_values, input_ids, attention_mask, pixel_mask, adapter_names)

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


def _weights_file(model_id: str | os.PathLike, kwargs: dict[str, Any]) -> str:
    """The adapter weights file `load_adapter` read, for error messages."""
    folder = os.path.join(model_id, kwargs["subfolder"]) if kwargs.get("subfolder") else os.fspath(model_id)
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return f"{folder}/{SAFETENSORS_WEIGHTS_NAME} (Hugging Face Hub)"
