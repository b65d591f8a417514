"""The build the tests run against: `make test` requires the compiled ops (with CUDA kernels
when torch has CUDA and nvcc exists), so CI cannot pass on the fallback by accident."""

import os
import shutil

import pytest
import torch

import tsv_fast


@pytest.mark.skipif(os.environ.get("TSV_FAST_REQUIRE_EXT") != "1", reason="TSV_FAST_REQUIRE_EXT is not set")
def test_compiled_extension_is_loaded():
    b = tsv_fast.backend()
    assert b.extension, str(b)
    if torch.version.cuda and shutil.which("nvcc") and os.environ.get("TSV_FAST_NO_CUDA") != "1":
        assert b.cuda_kernels, str(b)


def test_backend_reports_a_reason():
    assert str(tsv_fast.backend())
