"""Shared helpers of the I/O tests (not a test module)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flowplug.io import Ensemble, Metadata

#: The real configurations of ../shared/ensembles (never copied into the repository).
ENSEMBLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "ensembles"
#: Environment variable naming another folder that holds them.
ENSEMBLES_ENV = "FLOWPLUG_ENSEMBLES"


def ensembles_dir() -> Path:
    """The real-configurations folder, or skip the test with the reason.

    ``$FLOWPLUG_ENSEMBLES`` when it names a folder, else ``../shared/ensembles``
    beside the repository.
    """
    env = os.environ.get(ENSEMBLES_ENV)
    if env and Path(env).is_dir():
        return Path(env)
    if ENSEMBLES.is_dir():
        return ENSEMBLES
    where = f"${ENSEMBLES_ENV} = {env} is not a folder and " if env else f"${ENSEMBLES_ENV} is unset and "
    pytest.skip(f"real configurations not available: {where}{ENSEMBLES.resolve()} is absent")


def random_su(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Haar-ish random SU(n) matrices of shape (*shape, n, n), complex128 (QR of Gaussians)."""
    z = rng.normal(size=(*shape, n, n)) + 1j * rng.normal(size=(*shape, n, n))
    q, r = np.linalg.qr(z)
    d = np.diagonal(r, axis1=-2, axis2=-1)
    q = q * (d / np.abs(d))[..., None, :]
    det = np.linalg.det(q)
    q[..., :, 0] /= det[..., None]  # fix det = 1 (rescale a column by a phase)
    return q


def make_ensemble(lattice=(2, 3, 4, 5), n: int = 3, precision: int = 64, batch: int = 1, seed: int = 0) -> Ensemble:
    """Random SU(n) links on ``lattice``; for precision 32 the values are float32-representable."""
    rng = np.random.default_rng(seed)
    links = random_su(n, (batch, len(lattice), *lattice), rng)
    if precision == 32:
        links = links.astype(np.complex64).astype(np.complex128)
    meta = [Metadata(precision=precision, header={"trajectory": i}) for i in range(batch)]
    return Ensemble(torch.from_numpy(links), precision=precision, meta=meta)


def coded_ensemble(lattice=(2, 3, 4, 5), n: int = 3) -> Ensemble:
    """Non-unitary links whose (0, 0) entry encodes (mu, x, y, z, t): pins axis orders.

    Entry [0, 0] of U_mu(x, y, z, t) = 10000 mu + 1000 x + 100 y + 10 z + t (+ 0.5i);
    other entries are small distinct numbers. Exactly representable in float32.
    """
    d = len(lattice)
    idx = np.indices((d, *lattice))
    code = sum(idx[k] * 10 ** (d - k) for k in range(d + 1))
    links = np.zeros((1, d, *lattice, n, n), dtype=np.complex128)
    links[0, ..., 0, 0] = code + 0.5j
    for a in range(n):
        for b in range(n):
            if (a, b) != (0, 0):
                links[0, ..., a, b] = (a * n + b) / 8 - 1j / 16
    return Ensemble(torch.from_numpy(links), precision=32)
