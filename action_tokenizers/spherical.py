"""SpatialVLA's spherical translation grid: one joint token per step for (x, y, z).

A translation is converted to spherical coordinates — polar angle ``theta`` in [0, pi] (from +z),
azimuth ``phi`` in [-pi, pi] and radius ``r`` in [0, r_max] — and each coordinate gets Gaussian
equal-probability bins inside its range (the Gaussian is fitted to the data's coordinate and
truncated to the range: edges ``ppf(linspace(cdf(lo), cdf(hi), n + 1))``). The three bin indices
form ONE token ``(i_theta * n_phi + i_phi) * n_r + i_r``: the model predicts a direction and a step
length together, and a 7-d arm action takes 3 tokens per step instead of 7 (SpatialVLA, Sec. 3.2).

Decoding takes each coordinate's bin midpoint and converts back to Cartesian coordinates; the
round-trip error is at most half a bin in each spherical coordinate (not in x, y, z).
"""
from __future__ import annotations

import numpy as np

# (low, high) of theta, phi; r's high is fitted (the largest radius seen, so no bin is wasted).
THETA_RANGE = (0.0, np.pi)
PHI_RANGE = (-np.pi, np.pi)


def cartesian_to_spherical(xyz: np.ndarray) -> np.ndarray:
    """(..., 3) x, y, z -> (..., 3) theta, phi, r."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    rho = np.hypot(x, y)
    return np.stack([np.arctan2(rho, z), np.arctan2(y, x), np.hypot(rho, z)], axis=-1)


def spherical_to_cartesian(tpr: np.ndarray) -> np.ndarray:
    """(..., 3) theta, phi, r -> (..., 3) x, y, z."""
    t, p, r = tpr[..., 0], tpr[..., 1], tpr[..., 2]
    return np.stack([r * np.sin(t) * np.cos(p), r * np.sin(t) * np.sin(p), r * np.cos(t)], axis=-1)


def truncated_gaussian_edges(mu: float, sigma: float, lo: float, hi: float, n: int) -> np.ndarray:
    """(n + 1,) edges with equal mass under N(mu, sigma) restricted to [lo, hi]; increasing, ends lo/hi."""
    from scipy.stats import norm

    p_lo, p_hi = norm.cdf(lo, mu, sigma), norm.cdf(hi, mu, sigma)
    if not p_hi - p_lo > 1e-9:  # the Gaussian has (numerically) no mass in the range: fall back to uniform
        return np.linspace(lo, hi, n + 1)
    edges = np.clip(norm.ppf(np.linspace(p_lo, p_hi, n + 1), mu, sigma), lo, hi)
    edges[0], edges[-1] = lo, hi
    return np.maximum.accumulate(edges)


class SphericalGrid:
    """The fitted grid: per-coordinate edges ``[theta (n_t+1,), phi (n_p+1,), r (n_r+1,)]``."""

    def __init__(self, bins: tuple[int, int, int], edges: list[np.ndarray]):
        self.bins = tuple(int(b) for b in bins)
        self.edges = [np.asarray(e, dtype=np.float64) for e in edges]

    @property
    def vocab_size(self) -> int:
        return int(np.prod(self.bins))

    @property
    def centres(self) -> list[np.ndarray]:
        return [(e[:-1] + e[1:]) / 2 for e in self.edges]

    @classmethod
    def fit(cls, xyz: np.ndarray, bins: tuple[int, int, int], min_sigma: float) -> "SphericalGrid":
        """xyz (M, 3) translations -> the grid."""
        tpr = cartesian_to_spherical(xyz)
        r_max = float(max(tpr[:, 2].max(), min_sigma))
        ranges = (THETA_RANGE, PHI_RANGE, (0.0, r_max))
        edges = [truncated_gaussian_edges(float(tpr[:, i].mean()), max(float(tpr[:, i].std()), min_sigma),
                                          *ranges[i], bins[i]) for i in range(3)]
        return cls(bins, edges)

    def encode(self, xyz: np.ndarray) -> np.ndarray:
        """(...,  3) -> (...) joint token ids in [0, vocab_size). Radii beyond r_max go to the last bin."""
        tpr = cartesian_to_spherical(xyz)
        k = [np.clip(np.searchsorted(self.edges[i][1:-1], tpr[..., i], side="right"), 0, self.bins[i] - 1)
             for i in range(3)]
        return (k[0] * self.bins[1] + k[1]) * self.bins[2] + k[2]

    def split(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Joint ids -> per-coordinate bin indices (theta, phi, r)."""
        n_p, n_r = self.bins[1], self.bins[2]
        return ids // (n_p * n_r), (ids // n_r) % n_p, ids % n_r

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """(...) ids in range -> (..., 3) Cartesian translations at the bins' midpoints."""
        c = self.centres
        kt, kp, kr = self.split(ids)
        return spherical_to_cartesian(np.stack([c[0][kt], c[1][kp], c[2][kr]], axis=-1))

    def state(self) -> dict[str, np.ndarray]:
        return {f"spherical_edges_{i}": e for i, e in enumerate(self.edges)}

    @classmethod
    def from_state(cls, bins: tuple[int, int, int], state: dict[str, np.ndarray]) -> "SphericalGrid":
        return cls(bins, [state[f"spherical_edges_{i}"] for i in range(3)])


def axis_interpolation(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation on an increasing 1-D grid: for each ``new`` value the index ``i`` of its left
    neighbour in ``old`` and the weight ``w`` of the right one (clamped at the ends). Both (len(new),)."""
    t = np.clip(new, old[0], old[-1])
    i = np.clip(np.searchsorted(old, t, side="right") - 1, 0, len(old) - 2)
    gap = old[i + 1] - old[i]
    w = np.where(gap > 0, (t - old[i]) / np.where(gap > 0, gap, 1.0), 0.0)
    return i, w


def trilinear_weights(old: "SphericalGrid", new: "SphericalGrid") -> tuple[np.ndarray, np.ndarray]:
    """For every token of ``new``: the 8 old tokens around its bin centre and their weights, (T, 8) each —
    SpatialVLA's re-discretization of the joint translation embeddings (linear in each coordinate)."""
    axes = [axis_interpolation(o, n) for o, n in zip(old.centres, new.centres)]
    (it, wt), (ip, wp), (ir, wr) = axes
    nb_p, nb_r = old.bins[1], old.bins[2]
    idx, wts = [], []
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                i = ((it[:, None, None] + a) * nb_p + (ip[None, :, None] + b)) * nb_r + (ir[None, None, :] + c)
                w = ((wt if a else 1 - wt)[:, None, None] * (wp if b else 1 - wp)[None, :, None]
                     * (wr if c else 1 - wr)[None, None, :])
                idx.append(i.reshape(-1))
                wts.append(w.reshape(-1))
    return np.stack(idx, 1), np.stack(wts, 1)
