import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real datasets (../shared/datasets or $LOWBIT_DATA); skip when absent."""
    root = Path(os.environ.get("LOWBIT_DATA", SHARED))
    if not root.is_dir():
        pytest.skip(f"real datasets not found at {root}")
    return root
