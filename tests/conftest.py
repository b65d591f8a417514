import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tsv_fast.synthetic import clip_vit_base, synthetic_finetuned


@pytest.fixture(scope="session")
def small_base():
    """A real open_clip visual tower, shrunk (width 64, 2 blocks, 17 tokens) for speed."""
    return clip_vit_base(width=64, layers=2, patch_size=16, image_size=64, embed_dim=32, seed=0)


@pytest.fixture(scope="session")
def small_tasks(small_base):
    """Four fine-tuned variants with power-law spectra and a shared component."""
    return synthetic_finetuned(small_base, 4, seed=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
