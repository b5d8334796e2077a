r"""Prior (base) distributions of flows: standard normal, uniform U(1), Haar SU(N).

A prior has ``sample(n, generator=None) -> z`` in the canonical layout of its field kind
(DESIGN.md section 2) and ``log_prob(z) -> (B,) float64``. Densities are taken with
respect to the natural measure of the field space: Lebesgue measure for scalar fields,
the product of d theta over U(1) angles in (-pi, pi], and the product of normalised Haar
measures for SU(N) links (so the Haar prior has log-density exactly 0). Actions use the
same measures, so log p = -S - log Z and log q share their reference measure.

References:
    Albergo et al., arXiv:1904.12072 (normal prior); Kanwar et al., arXiv:2003.06413
    (uniform U(1) prior); Boyda et al., arXiv:2008.05456, section II (Haar measure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from flowplug import groups
from flowplug.errors import ConfigError, ShapeError
from flowplug.theory import su_n


def _lattice(lattice: Sequence[int]) -> tuple[int, ...]:
    lat = tuple(int(v) for v in lattice)
    if not lat or any(v < 1 for v in lat):
        raise ConfigError(f"lattice must be a non-empty list of positive extents; found {list(lattice)}")
    return lat


class _Prior(nn.Module):
    """Common part: a lattice, a device-tracking buffer, a shape check."""

    field: str = ""
    _anchor: torch.Tensor  # buffer: follows the module's device

    def __init__(self, lattice: Sequence[int], field: str | None = None) -> None:
        super().__init__()
        self.lattice = _lattice(lattice)
        if field is not None and self.field and field != self.field:
            raise ConfigError(f"{type(self).__name__} produces field kind '{self.field}', not '{field}'")
        self.register_buffer("_anchor", torch.zeros((), dtype=torch.float64), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device on which samples are drawn."""
        return self._anchor.device

    def event_shape(self) -> tuple[int, ...]:
        """Shape of one configuration (the tensor shape without the batch axis)."""
        raise NotImplementedError

    def _check(self, z: torch.Tensor) -> None:
        if tuple(z.shape[1:]) != self.event_shape():
            raise ShapeError(
                f"{type(self).__name__}: expected shape (B, {', '.join(map(str, self.event_shape()))}); "
                f"found {tuple(z.shape)}"
            )


class NormalPrior(_Prior):
    r"""Independent standard normal variables at every site, for real scalar fields.

    Arguments:
        lattice: (L_0, ..., L_{d-1}).
        field: Optional check: must be ``"scalar"``.

    ``sample(n)`` gives shape (n, L_0, ..., L_{d-1}) float64; ``log_prob(z)`` is
    sum_x [-z_x^2/2 - log(2 pi)/2], shape (B,) float64.

    Raises:
        ConfigError: on an invalid lattice.
    """

    field = "scalar"

    def event_shape(self) -> tuple[int, ...]:
        return self.lattice

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` configurations (float64) with ``generator``."""
        return torch.randn((int(n), *self.lattice), generator=generator, dtype=torch.float64, device=self.device)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density, shape (B,), float64. Raises ShapeError on a wrong shape."""
        self._check(z)
        z = z.to(torch.float64)
        return (-0.5 * z * z).flatten(1).sum(1) - 0.5 * math.log(2 * math.pi) * math.prod(self.lattice)


class UniformU1Prior(_Prior):
    r"""Independent uniform U(1) link angles in (-pi, pi] (the Haar measure of U(1)).

    Arguments:
        lattice: (L_0, ..., L_{d-1}); there are d links per site.
        field: Optional check: must be ``"u1"``.

    ``sample(n)`` gives shape (n, d, L_0, ..., L_{d-1}) float64; ``log_prob`` is
    -d V log(2 pi) for every configuration, shape (B,) float64.

    Raises:
        ConfigError: on an invalid lattice.
    """

    field = "u1"

    def event_shape(self) -> tuple[int, ...]:
        return (len(self.lattice), *self.lattice)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` configurations of angles in (-pi, pi] with ``generator``."""
        u = torch.rand((int(n), *self.event_shape()), generator=generator, dtype=torch.float64, device=self.device)
        return groups.wrap_angle(2 * math.pi * u - math.pi)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density -d V log(2 pi), shape (B,), float64. Raises ShapeError on a wrong shape."""
        self._check(z)
        n_links = math.prod(self.event_shape())
        return torch.full((z.shape[0],), -n_links * math.log(2 * math.pi), dtype=torch.float64, device=z.device)


class HaarPrior(_Prior):
    r"""Independent Haar-random SU(N) links.

    Densities are relative to the normalised Haar measure, so ``log_prob`` is 0. Samples
    come from :func:`flowplug.groups.haar_random` (QR of a complex Ginibre matrix with
    the phase fix of Mezzadri, math-ph/0609050), for SU(3) from
    :func:`flowplug.groups.haar_random_su3` (two Gaussian rows orthonormalised and their
    conjugated cross product; also exact Haar, several times cheaper).

    Arguments:
        lattice: (L_0, ..., L_{d-1}).
        n: N of SU(N) (N >= 2); or give ``field="su3"``.
        field: ``"su<N>"``; used when ``n`` is not given.

    ``sample(n)`` gives shape (n, d, L_0, ..., L_{d-1}, N, N) complex128.

    Raises:
        ConfigError: on an invalid lattice or N.
    """

    def __init__(self, lattice: Sequence[int], n: int | None = None, field: str | None = None) -> None:
        super().__init__(lattice)
        if n is None:
            n = su_n(field) if field is not None else None
            if n is None:
                raise ConfigError(f"HaarPrior needs n or field='su<N>'; found n=None, field={field!r}")
        if int(n) < 2:
            raise ConfigError(f"HaarPrior needs N >= 2; found {n}")
        self.n = int(n)
        self.field = f"su{self.n}"

    def event_shape(self) -> tuple[int, ...]:
        return (len(self.lattice), *self.lattice, self.n, self.n)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` configurations of Haar-random links (complex128) with ``generator``
        (SU(3): :func:`flowplug.groups.haar_random_su3`, the cheaper exact draw)."""
        shape = (int(n), len(self.lattice), *self.lattice)
        if self.n == 3:
            return groups.haar_random_su3(shape, generator=generator, device=self.device)
        return groups.haar_random(shape, self.n, generator=generator, device=self.device)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density relative to Haar measure: zeros of shape (B,), float64."""
        self._check(z)
        return torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
