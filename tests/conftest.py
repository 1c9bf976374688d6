"""Shared fixtures. Environment first: no model hub, no Ray token auth, quiet Ray."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    """Real MVTec-layout data shipped beside the checkout (read in place, never copied)."""
    if not (DATASETS / "magnetic_tile").is_dir():
        pytest.skip("../shared/datasets is not present")
    return DATASETS
