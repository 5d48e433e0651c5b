"""What several test files share: a stand-in for the Fréchet distance in runs that test everything around it."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402


@pytest.fixture
def quick_frechet(monkeypatch):
    """fid.frechet_distance without its 2048 x 2048 matrix square root (15-40 s on this CPU, every call) for tests
    of what surrounds FID: the features, the reference, the files, the bookkeeping. It keeps ||mu1 - mu2||^2 +
    Tr(S1) + Tr(S2) (always > 0 here) and drops the -2 Tr((S1 S2)^1/2) term; tests/test_fid.py checks the real one.
    Returns the list of calls, one (mu1, sigma1, mu2, sigma2) shape tuple each."""
    calls = []

    def frechet_without_sqrtm(mu1, sigma1, mu2, sigma2, eps=1e-6):
        calls.append((mu1.shape, sigma1.shape, mu2.shape, sigma2.shape))
        return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2))
    monkeypatch.setattr(fid, "frechet_distance", frechet_without_sqrtm)
    return calls
