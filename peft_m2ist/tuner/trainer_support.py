"""What transformers' `Trainer` reads from the container, so that it works with its default `TrainingArguments`.

For a `PeftModel`, transformers 5 inspects the *base model* (`model.get_base_model()`, the container holding the
towers), not the `PeftModel`'s own forward:

- `Trainer._set_signature_columns_if_needed` keeps the dataset columns named in `container.forward`'s signature
  (`remove_unused_columns=True` drops the others);
- `label_names` defaults to `find_labels(type(container))`, the forward parameters with "label" in their name;
  without it `evaluate()` computes no `eval_loss`;
- `model_accepts_loss_kwargs` is `container.accepts_loss_kwargs` when set, else whether its forward takes
  `**kwargs`; when True, the Trainer leaves the loss unscaled under gradient accumulation, expecting the model to
  use `num_items_in_batch` (M2IST's loss is a batch mean and ignores it).

`VisionTextPair` declares all of that itself. Any other container (`CLIPModel`, `VisionTextDualEncoderModel`, ...)
gets, while an M2IST model wraps it, a subclass of its own class (same name) whose `forward` is the original one,
unchanged, with a signature that also lists the REC arguments it lacks (`pixel_mask`, `labels`, ...) as
keyword-only, and `accepts_loss_kwargs = False`. `unload()` puts the original class back.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

REC_FORWARD_ARGS = ("pixel_values", "input_ids", "attention_mask", "pixel_mask", "labels")
ORIGINAL_CLASS = "_m2ist_original_class"


def _needs_signature(cls: type) -> bool:
    params = inspect.signature(cls.forward).parameters
    return any(name not in params for name in REC_FORWARD_ARGS) or getattr(cls, "accepts_loss_kwargs", None) is not False


@functools.cache
def _rec_subclass(cls: type) -> type:
    """`cls` with a forward signature listing the REC arguments (the forward itself is `cls.forward`)."""
    signature = inspect.signature(cls.forward)
    params = list(signature.parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    others = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in REC_FORWARD_ARGS if name not in signature.parameters]

    def forward(self, *args, **kwargs):
        return cls.forward(self, *args, **kwargs)

    functools.update_wrapper(forward, cls.forward)
    del forward.__wrapped__  # inspect.signature must read __signature__, not follow the original
    forward.__signature__ = signature.replace(parameters=others + extra + var_keyword)
    return type(cls.__name__, (cls,), {
        "forward": forward,
        "accepts_loss_kwargs": False,
        ORIGINAL_CLASS: cls,
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
    })


def declare_rec_signature(container: nn.Module) -> None:
    """Give `container` the forward signature and loss flag the Trainer reads (see the module docstring)."""
    cls = type(container)
    if ORIGINAL_CLASS in cls.__dict__ or not _needs_signature(cls):
        return
    container.__class__ = _rec_subclass(cls)


def restore_container_class(container: nn.Module) -> None:
    """Undo `declare_rec_signature`."""
    original = type(container).__dict__.get(ORIGINAL_CLASS)
    if original is not None:
        container.__class__ = original
