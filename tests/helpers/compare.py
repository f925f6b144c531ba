"""Deep equality of checkpoint state."""

from __future__ import annotations

from typing import Any

import torch


def assert_same_state(actual: Any, expected: Any, path: str = "", strict_types: bool = True) -> None:
    """Deep equality of checkpoint state: tensors bit for bit with their dtype; containers key by key.

    ``strict_types`` also requires the same types everywhere; without it tuples and lists compare alike.
    """
    if strict_types:
        assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, path
        assert torch.equal(actual.cpu(), expected.cpu()), path
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{path}.{key}", strict_types)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state(a, e, f"{path}.{i}", strict_types)
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
