"""The pickle-free encoding of Lightning checkpoint state."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.checkpoints import fake_checkpoint
from lightning_lora_ckpt.format.state_codec import StateEncodingError, decode_state, encode_state
from lightning_lora_ckpt.lightning.async_io import snapshot_tensor
from lightning_lora_ckpt.lightning.checkpoint_dict import payload_from_checkpoint


def roundtrip(obj: object) -> object:
    tree, tensors = encode_state(obj)
    return decode_state(json.loads(json.dumps(tree, allow_nan=False)), tensors)


def test_roundtrip_of_optimizer_like_state() -> None:
    state = {
        "optimizer_states": [
            {
                "state": {
                    0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
                    1: {"step": torch.tensor(1.0)},
                },
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None}],
            }
        ],
        "rng": {"numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.0), "python": (3, (1, 2), None)},
        "misc": {"nan": math.nan, "inf": -math.inf, "bytes": b"\x00\x01", "dtype": torch.bfloat16},
        "path": pathlib.Path("/a/b"),
        "np_scalar": np.float64(2.5),
        "__lora_ckpt__": "a key that looks like the tag",
        (1, "x"): "tuple key",
    }
    out = roundtrip(state)
    opt = out["optimizer_states"][0]
    assert set(opt["state"]) == {0, 1}
    assert torch.equal(opt["state"][0]["exp_avg"], state["optimizer_states"][0]["state"][0]["exp_avg"])
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999)
    assert out["rng"]["numpy"][0] == "MT19937" and out["rng"]["numpy"][1].dtype == np.uint32
    assert np.array_equal(out["rng"]["numpy"][1], np.arange(5))
    assert out["rng"]["python"] == (3, (1, 2), None)
    assert math.isnan(out["misc"]["nan"]) and out["misc"]["inf"] == -math.inf
    assert out["misc"]["bytes"] == b"\x00\x01" and out["misc"]["dtype"] is torch.bfloat16
    assert out["path"] == pathlib.Path("/a/b") and out["np_scalar"] == 2.5
    assert out["__lora_ckpt__"] == "a key that looks like the tag" and out[(1, "x")] == "tuple key"


def test_a_staged_payload_is_a_snapshot() -> None:
    checkpoint = fake_checkpoint(step=1)
    payload = payload_from_checkpoint(checkpoint, defer_copy=True)
    live = [*checkpoint["state_dict"].values(), *payload.state_tensors.values()]
    payload.map_tensors(snapshot_tensor)
    for tensor in live:
        tensor.add_(1)
    saved = fake_checkpoint(step=1)["state_dict"]
    assert all(torch.equal(payload.adapter[k], saved[k]) for k in saved)
    assert not {id(t) for t in payload.state_tensors.values()} & {id(t) for t in live}


def test_unsupported_value_names_its_key() -> None:
    with pytest.raises(StateEncodingError, match=r"'callbacks\.MyCallback\.fn'"):
        encode_state({"callbacks": {"MyCallback": {"fn": lambda x: x}}})
    with pytest.raises(StateEncodingError, match="object ndarray"):
        encode_state({"a": np.array([object()], dtype=object)})


@pytest.mark.parametrize(
    "tree",
    [
        {"__lora_ckpt__": "tensor", "v": "missing"},
        {"__lora_ckpt__": "pickle", "v": "x"},
        {"__lora_ckpt__": "tuple", "v": "notalist"},
        {"__lora_ckpt__": "map", "v": [[["unhashable"], 1]]},
        {"__lora_ckpt__": "dtype", "v": "Tensor"},
        {"__lora_ckpt__": "tuple", "v": [], "extra": 1},
    ],
)
def test_malformed_trees_are_rejected(tree: object) -> None:
    with pytest.raises(ValueError):
        decode_state(tree, {})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_roundtrip_property(value: object) -> None:
    assert roundtrip(value) == value
