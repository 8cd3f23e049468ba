import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng()


def random_rotation(rng, reflect=False):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q = q @ np.diag([1.0, 1.0, -1.0])
    return q.astype(np.float64)


def random_molecules(rng, sizes, scale=1.5):
    pos, typ = [], []
    for n in sizes:
        x = rng.normal(size=(n, 3)) * scale
        pos.append((x - x.mean(0)).astype(np.float32))
        typ.append(rng.integers(0, 5, size=n).astype(np.int32))
    return pos, typ
