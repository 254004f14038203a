"""Loading models from untrusted run folders: config.json checked against the weights' header before anything is
built, and the weights' values checked (genfast.models._checkpoint.check_weights) on every loader path.

The run folders are written by hand here (config.json + safetensors, the layout genfast.training.checkpoint
writes), so a hostile file costs no training.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from genfast.models._checkpoint import CheckpointError, check_weights


def _model_state(dtype=torch.float32):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- check_weights
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_check_weights_refuses_another_dtype_kind(dtype):
    model, state = _model_state()
    state["0.weight"] = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(CheckpointError, match=r"tensor '0.weight' is .*\((integer|bool)\) in the file.*float32"):
        check_weights(state, model, "w.safetensors")
    assert issubclass(CheckpointError, ValueError)


def test_check_weights_keeps_batchnorm_counter_and_same_dtypes_quiet(caplog):
    model, state = _model_state()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    with caplog.at_level(logging.WARNING, logger="genfast"):
        check_weights(state, model, "w.safetensors")
        check_weights(state, model.state_dict(), "w.safetensors")  # a state dict works as well as the module
    assert caplog.records == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_check_weights_announces_float_casts_in_one_line(dtype, caplog):
    model, state = _model_state()
    for key in ("0.weight", "0.bias", "1.weight"):
        state[key] = state[key].to(dtype)
    with caplog.at_level(logging.WARNING, logger="genfast"):
        check_weights(state, model, "w.safetensors")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "\n" not in message and "w.safetensors" in message
    assert f"3 {str(dtype).replace('torch.', '')} -> float32" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_weights_refuses_nonfinite_unless_allowed(bad):
    model, state = _model_state()
    state["1.running_var"][2] = bad
    with pytest.raises(CheckpointError, match=r"'1.running_var' holds 1 non-finite"):
        check_weights(state, model, "w.safetensors")
    check_weights(state, model, "w.safetensors", allow_nonfinite=True)
    with pytest.raises(TypeError, match="allow_nonfinite"):
        check_weights(state, model, "w.safetensors", allow_nonfinite="yes")
