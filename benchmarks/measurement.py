"""Measuring the memory of one training step: the exact account (what autograd keeps, the weights, gradients and
AdamW state), the peak of live tensors on any device, and the CUDA allocator's peak on a GPU."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.utils.checkpoint
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from peft_m2ist.towers.quantization import plain_tensors


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def _stored(tensors) -> list[torch.Tensor]:
    """The plain tensors that hold `tensors`' data (a quantized weight, int8 towers: its int8 values and scales)."""
    return [inner for t in tensors for inner in plain_tensors(t)]


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in _stored(tensors):
        info = _storage(t)
        if info is not None:
            seen[info[0]] = info[1]
    return sum(seen.values())


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast=None) -> torch.Tensor:
    """One training step: forward, backward, AdamW step; gradients are freed (set to None) first."""
    optimizer.zero_grad(set_to_none=True)
    with autocast() if autocast is not None else nullcontext():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


class SavedForBackward:
    """Context manager collecting the storages autograd keeps for backward while it is active, each counted once.

    Those are the tensors packed by `saved_tensors_hooks`, plus the tensor inputs of `torch.utils.checkpoint.checkpoint`
    calls: a checkpointed function keeps them for its recompute, where the hooks do not see them. Storages in
    `exclude` (data pointers, e.g. of parameters and buffers) go to `excluded` instead of `storages`.

    Only storages still alive when the context exits count: a tensor saved by a part of the graph that the forward
    then drops (an output nothing uses) is not kept for backward, and the allocator may hand its address to a later
    tensor, which must not be mistaken for it.
    """

    def __init__(self, exclude: set[int] = frozenset()) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}  # data pointer -> bytes, of the storages alive at exit
        self.excluded: dict[int, int] = {}
        self.unreadable = 0
        self._packed: dict[int, tuple[StorageWeakRef, int]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._real_checkpoint = torch.utils.checkpoint.checkpoint

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        info = _storage(t)
        if info is None:
            self.unreadable += 1
        elif info[0] in self.exclude:
            self.excluded[info[0]] = info[1]
        elif info[1] > 0:
            known = self._packed.get(info[0])
            if known is None or known[0].expired():  # a new storage, possibly at a freed one's address
                self._packed[info[0]] = (StorageWeakRef(t.untyped_storage()), info[1])
        return t

    def _checkpoint(self, function, *args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                self._pack(value)
        return self._real_checkpoint(function, *args, **kwargs)

    def __enter__(self) -> SavedForBackward:
        torch.utils.checkpoint.checkpoint = self._checkpoint  # seen by callers that look it up at call time
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        torch.utils.checkpoint.checkpoint = self._real_checkpoint
        self.storages = {ptr: size for ptr, (ref, size) in self._packed.items() if not ref.expired()}


def exact_account(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast=None) -> dict:
    """Bytes of one training step, machine-independent up to the kernels' choice of what to save.

    - `weights`: every parameter and buffer of the model (frozen ones included), each storage once (a quantized
      weight's int8 values and scales);
    - `trainable`: the trainable parameters; `grads`: their gradients after backward;
    - `optimizer`: every tensor in the AdamW state after the step (exp_avg, exp_avg_sq, step);
    - `activations`: what `SavedForBackward` collects during forward (saved tensors and checkpoint inputs), each
      storage once, EXCLUDING the storages of parameters and buffers (those are already in `weights`;
      `params_saved` counts them separately);
    - `total` = weights + grads + optimizer + activations.
    """
    model_ptrs = {info[0] for t in _stored(list(model.parameters()) + list(model.buffers()))
                  if (info := _storage(t)) is not None}
    optimizer.zero_grad(set_to_none=True)
    with SavedForBackward(exclude=model_ptrs) as saved, (autocast() if autocast is not None else nullcontext()):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    unused = sum(p.numel() for p in trainable if p.grad is None)
    state_tensors = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    account = {
        "weights": _unique_bytes(list(model.parameters()) + list(model.buffers())),
        "trainable": _unique_bytes(trainable),
        "grads": _unique_bytes([p.grad for p in trainable if p.grad is not None]),
        "optimizer": _unique_bytes(state_tensors),
        "activations": saved.nbytes,
        "params_saved": sum(saved.excluded.values()),
        "unreadable_saved": saved.unreadable,
        "unused_trainable_params": unused,
    }
    account["total"] = account["weights"] + account["grads"] + account["optimizer"] + account["activations"]
    optimizer.zero_grad(set_to_none=True)
    return account


def extrapolate(small: dict, large: dict, b_small: int, b_large: int, b_target: int) -> dict:
    """Activations are affine in the batch size: fit a + b*batch from two measured batches, evaluate at `b_target`."""
    slope = (large["activations"] - small["activations"]) / (b_large - b_small)
    acts = large["activations"] + slope * (b_target - b_large)
    out = {k: large[k] for k in ("weights", "trainable", "grads", "optimizer")}
    out["activations"] = round(acts)
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
    out["activations_per_sample"] = slope
    return out


# ---------------------------------------------------------------------------------------------- peaks
class LiveTensorPeak(TorchDispatchMode):
    """Tracks the bytes of tensor storages allocated by ATen ops while active, and their peak.

    After every op, the storages it returned that are new (not the storage of one of its inputs, which views and
    in-place ops return) join the live set; storages whose last reference is gone leave it. `peak` is the largest
    live total at an op boundary, and `peak_op` the op that reached it with the shape of its first output. Storages
    that existed before (weights, optimiser state, the batch) are not counted. Kernel workspaces and allocator
    rounding are not seen: this is the tensor-level part of what `torch.cuda.max_memory_allocated` measures, on any
    device and without a GPU; for given kernels it is the same on every run and machine. (torch's own
    `torch.distributed._tools.mem_tracker.MemTracker` does more, but registers gradient hooks on every parameter
    and fails on frozen ones, which every method here has.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.peak_op: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        inputs = {info[0] for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and (info := _storage(t)) is not None}
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outputs:
            info = _storage(t)  # None for tensors without a plain storage (sparse, nested): not counted
            if info is not None and info[0] and info[0] not in inputs and info[0] not in self.live:
                self.live[info[0]] = (StorageWeakRef(t.untyped_storage()), info[1])
                self.current += info[1]
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = f"{func} -> {tuple(outputs[0].shape)}" if outputs else str(func)
        return out


def live_peak(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast=None) -> dict:
    """Peak bytes of live tensors over one training step after a warm-up step (`LiveTensorPeak`).

    Reported like `cuda_peak`: the step's peak increment plus the method's own weights and optimiser state (exact
    bytes), so the two read the same; this one runs on any device and names the op where the peak happens.
    """
    train_step(model, optimizer, batch, autocast)  # warm-up (allocates the optimizer state)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    tracker = LiveTensorPeak()
    with tracker:
        train_step(model, optimizer, batch, autocast)
    optimizer.zero_grad(set_to_none=True)
    own = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    state = _unique_bytes([v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)])
    return {"step_increment": tracker.peak, "peak_op": tracker.peak_op, "own_weights": own, "own_optimizer": state,
            "training_memory": tracker.peak + own + state}


@contextmanager
def tower_micro_batches(model: nn.Module, size: int | None) -> Iterator[None]:
    """Run an M2IST model's frozen towers in micro-batches of `size` (`M2ISTConfig.tower_micro_batch_size`)."""
    config = model.peft_config[model.active_adapter]
    before = config.tower_micro_batch_size
    config.tower_micro_batch_size = size
    try:
        yield
    finally:
        config.tower_micro_batch_size = before


def cuda_peak(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast=None) -> dict:
    """`torch.cuda.max_memory_allocated` over one training step after a warm-up step.

    Other models may be resident on the card, so the method's training memory is reported as the peak increment
    over the resident state plus the method's own weights, gradients-free optimizer state (exact bytes).
    """
    train_step(model, optimizer, batch, autocast)  # warm-up (allocates the optimizer state)
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_step(model, optimizer, batch, autocast)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    optimizer.zero_grad(set_to_none=True)
    own = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    state = _unique_bytes([v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)])
    return {"peak_allocated": peak, "resident_before": before, "step_increment": peak - before,
            "own_weights": own, "own_optimizer": state, "training_memory": peak - before + own + state}

