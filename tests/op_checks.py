"""Checks every compiled op's tests share."""

import pytest
import torch


def refuses_grad_inputs(op_name: str, args: tuple, arg_name: str):
    """``tsv_fast::op_name`` has no derivative: with grad mode on it refuses ``args`` (where
    ``arg_name`` requires grad) with a NotImplementedError, and opcheck finds its Autograd kernel
    and only that refusal; under ``torch.no_grad`` it runs. Returns that run's result."""
    op = getattr(torch.ops.tsv_fast, op_name)
    with pytest.raises(NotImplementedError, match=rf"tsv_fast::{op_name} is not differentiable, but its "
                                                  rf"argument {arg_name} requires grad: call it under torch.no_grad"):
        op(*args)
    checks = torch.library.opcheck(op.default, args, raise_exception=False)
    assert checks.pop("test_autograd_registration") == "SUCCESS"  # an Autograd kernel is registered
    assert all(isinstance(e, NotImplementedError) and "is not differentiable" in str(e) for e in checks.values())
    with torch.no_grad():
        return op(*args)
