"""`TowerEncoder` on its own, without the tuner: the towers room runs a pair frozen with its taps recording."""

from __future__ import annotations

import pytest
import torch
from tiny_towers import IMAGE_SIZE, TEXT_TOKENS, batch, build_pair

from peft_m2ist.towers.encoder import TowerEncoder
from peft_m2ist.towers.recording import TapRecorder
from peft_m2ist.towers.tokens import output_tensor

VISION_TAP, TEXT_TAP = "vision_model.layers.0.mlp", "text_model.encoder.layer.0.output"


def _encoder(pair, recorder: TapRecorder, ran_in_train_mode: list[bool] | None = None, **kwargs) -> TowerEncoder:
    """The pair's two towers, with a forward hook standing in for a tap layer on one module of each (it notes the
    module's mode in `ran_in_train_mode`)."""
    for name in (VISION_TAP, TEXT_TAP):
        def hook(module, _args, output, name=name):
            if ran_in_train_mode is not None:
                ran_in_train_mode.append(module.training)
            if recorder.wants(name):
                recorder.records[name] = output_tensor(output).detach()

        pair.get_submodule(name).register_forward_hook(hook)
    return TowerEncoder(pair.vision_model, pair.text_model, recorder, [VISION_TAP], [TEXT_TAP],
                        image_size=IMAGE_SIZE, max_text_tokens=TEXT_TOKENS, **kwargs)


def test_micro_batches_give_the_whole_batch_features_with_the_towers_frozen():
    pair = build_pair("vit+bert").train()
    inputs = batch(size=3, labels=False)
    ran_in_train_mode: list[bool] = []
    threads = torch.get_num_threads()
    # one BLAS thread: with several, a matrix product may split a 3-row and a 2-row batch over the threads differently
    # and round the last bit otherwise (seen on a 2-core machine); the encoder's own work must still be exact
    torch.set_num_threads(1)
    try:
        whole = _encoder(pair, TapRecorder(), ran_in_train_mode).encode(**inputs)
        encoder = _encoder(build_pair("vit+bert"), TapRecorder(), tower_micro_batch_size=2)
        chunked = encoder.encode(**inputs)
        halves = {**encoder.encode_vision(inputs["pixel_values"], inputs["pixel_mask"]),
                  **encoder.encode_text(inputs["input_ids"], inputs["attention_mask"])}
    finally:
        torch.set_num_threads(threads)
    assert whole.to_tensors().keys() == chunked.to_tensors().keys()
    for key, tensor in whole.to_tensors().items():
        assert torch.equal(chunked.to_tensors()[key], tensor), key
    assert set(whole.taps) == {VISION_TAP, TEXT_TAP}
    assert whole.taps[VISION_TAP].shape[:2] == whole.vision.shape[:2]  # on the vision tower's final tokens
    assert not any(t.requires_grad for t in whole.to_tensors().values())
    assert ran_in_train_mode == [False, False]  # eval mode while they run, their own mode again afterwards
    assert pair.vision_model.training and pair.text_model.training
    # the two halves are the whole
    assert halves.keys() == chunked.to_tensors().keys()
    assert all(torch.equal(halves[key], tensor) for key, tensor in chunked.to_tensors().items())


def test_towers_alone_record_nothing_and_a_taken_over_recorder_refuses():
    recorder = TapRecorder()
    features = _encoder(build_pair("vit+bert"), recorder, record_taps=False).encode(**batch(labels=False))
    assert features.taps == {} and not recorder.active
    recorder.taken_over = True
    with pytest.raises(RuntimeError, match="wrapped again"):
        _encoder(build_pair("vit+bert"), recorder).encode(**batch(labels=False))


def test_inputs_are_checked_before_a_tower_runs():
    recorder = TapRecorder()
    inputs = batch(labels=False)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], inputs["input_ids"]], dim=1)  # longer than max_text_tokens
    with pytest.raises(ValueError, match="max_text_tokens"):
        _encoder(build_pair("vit+bert"), recorder).encode(**inputs)
    assert not recorder.active and recorder.records == {}
