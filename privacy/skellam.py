"""Distributed DP for a release under secure aggregation: the distributed Skellam mechanism.

A release family's statistic is a sum of per-record vectors of L2 norm <= 1. Under secure
aggregation with ``noise: distributed`` every site

1. scales each record's vector by ``gamma`` (:attr:`DistributedRelease.scale`) and rounds it
   to integers by *conditional randomized rounding* (Kairouz, Liu & Steinke 2021, "The
   Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
   Aggregation", §4.1): unbiased stochastic rounding, redrawn until the rounded vector's
   L2 norm is at most ``l2`` (:func:`rounded_l2_bound`). One record then moves the site's
   integer sum -- and the federation's -- by a vector of L2 norm <= ``l2`` and L1 norm
   <= ``l1 = l2 * min(sqrt(d), l2)`` (integer coordinates: ``|v| <= v^2``);
2. adds its *share* of Skellam noise, ``Sk(mu / t)`` per coordinate -- a Poisson(mu / 2t)
   minus an independent Poisson(mu / 2t), from the OS's entropy. A sum of independent
   Skellams is a Skellam (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for
   Differentially Private Federated Learning"), so whenever at least ``t`` (the secure-
   aggregation threshold: fewer abort the round) sites' shares are in the sum, its noise is
   at least ``Sk(mu)``: the central mechanism, with ``n / t`` times the variance when all
   ``n`` sites survive (the price of tolerating ``n - t`` dropouts);
3. masks the integer vector (``client/secagg.py``); the server learns only the sum.

The accountant is the RDP of the Skellam mechanism (Agarwal et al. 2021, Thm 3.5 / Cor.
3.6): for integer sensitivities ``l1``, ``l2`` and variance ``mu`` per coordinate, at every
order ``alpha > 1``

    eps(alpha) <= alpha l2^2 / (2 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu)),

converted to (eps, delta) by Opacus' RDP conversion, as ``privacy/accounting.py`` does. The
PRV accountant has no Skellam mechanism, so a ledger that holds a Skellam entry is
accounted by RDP (a valid upper bound; for one Gaussian-like release a little looser than
PRV's).

The scale is the largest the bit width allows: the signed sum of every coordinate -- at
most ``n * max_records * l2`` from the data plus the noise of all ``n`` shares -- must
stay below ``2^(bits-1)`` except with probability :data:`OVERFLOW_PROBABILITY` (the
Skellam's exact Chernoff tail, union over every coordinate), so the modular sum is the
integer sum.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy.special import gammaln
from torch import Tensor

from .accounting import quiet_opacus

#: integer Renyi orders (the theorem's); composition with Gaussian entries uses the same
ORDERS: tuple[int, ...] = tuple(range(2, 65)) + tuple(range(72, 257, 8)) + (384, 512, 1024)
#: beta of Kairouz et al.'s rounded-norm bound: a rounding is redrawn with probability < beta
ROUNDING_BETA = math.exp(-0.5)
#: the accepted probability that one round's modular sum wraps around somewhere
OVERFLOW_PROBABILITY = 2.0 ** -40
_CALIBRATION_TOLERANCE = 1e-4  # relative, on mu
MAX_SCALE = 2.0 ** 30  # finer gains nothing (the rounding's share of l2 is already ~1e-9) and float64 stays exact
#: the largest Poisson rate a site draws (its share / 2). numpy's Poisson sampler works in
#: float64: at rates near 1e18 its draws fall on a grid of hundreds (the float spacing), so
#: the noise would leave the sum's low bits -- and one record's -- exposed (Mironov 2012's
#: attack in integer form), and its log-gamma terms lose precision. At <= 2^30 every draw is
#: an exact integer and the acceptance terms are exact to ~1e-6. The scale is capped so
#: that a share stays below it; the rounding then adds ~1e-5 to l2, nothing in utility.
MAX_POISSON_RATE = 2.0 ** 30


# -- the accountant ---------------------------------------------------------------------

def skellam_rdp(mu: float, l1: float, l2: float, orders: tuple[int, ...] = ORDERS) -> np.ndarray:
    """RDP of the Skellam mechanism at ``orders`` (Agarwal et al. 2021, Thm 3.5)."""
    a = np.asarray(orders, dtype=np.float64)
    l2sq = l2 * l2
    return a * l2sq / (2.0 * mu) + np.minimum(((2.0 * a - 1.0) * l2sq + 6.0 * l1) / (4.0 * mu * mu),
                                              3.0 * l1 / (2.0 * mu))


@lru_cache(maxsize=256)
def gaussian_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at :data:`ORDERS` (Opacus)."""
    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                               orders=list(map(float, ORDERS))))


def poisson_subsampled_rdp(rdp_at: Callable[[np.ndarray], np.ndarray], sample_rate: float,
                           orders: tuple[int, ...] = ORDERS) -> np.ndarray:
    """RDP at ``orders`` of any mechanism whose RDP at integer orders is ``rdp_at(orders)``,
    run on a Poisson sample of the records at ``sample_rate`` (add/remove-one neighbours):
    the general upper bound of Zhu & Wang 2019 ("Poisson Subsampled Renyi Differential
    Privacy", ICML, Thm 6), for integer ``alpha >= 2``,

        eps'(alpha) <= log{ (1-q)^(alpha-1) (alpha q - q + 1) + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
                           + 3 sum_{l=3..alpha} C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) } / (alpha - 1),

    in log space; never above the mechanism's own RDP (sampling is a mixture, and Renyi
    divergence is jointly quasi-convex). The accountant of a DP-FedSGD round with distributed
    Skellam noise (:func:`subsampled_skellam_rdp`, docs/aggregation.md)."""
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample rate {sample_rate} is not in [0, 1]")
    alphas = np.asarray(orders, dtype=np.int64)
    if alphas.min() < 2:
        raise ValueError("the bound holds at integer orders >= 2")
    base = np.asarray(rdp_at(alphas.astype(np.float64)), dtype=np.float64)
    if sample_rate == 1.0:
        return base
    if sample_rate == 0.0:
        return np.zeros_like(base)
    ls = np.arange(2, int(alphas.max()) + 1)
    eps = np.asarray(rdp_at(ls.astype(np.float64)), dtype=np.float64)  # eps[l - 2] = eps(l)
    # The l = 0 and 1 terms of the binomial sum are the bound's first term, so the braces are
    # 1 + sum_{l>=2} C(alpha,l) q^l (1-q)^(alpha-l) (c_l e^((l-1) eps(l)) - 1), c_2 = 1, c_l = 3:
    # positive terms, summed in log space and added to 1 by log1p (no cancellation near 0).
    x = (ls - 1) * eps
    log_excess = x + np.log(3.0 - np.exp(-x))  # log(3 e^x - 1)
    log_excess[0] = x[0] + math.log(-math.expm1(-x[0])) if x[0] > 0 else -math.inf  # log(e^x - 1)
    log_q, log_1q = math.log(sample_rate), math.log1p(-sample_rate)
    out = np.empty(len(alphas))
    for i, a in enumerate(alphas):
        l = ls[: a - 1]  # 2 .. alpha
        log_binom = gammaln(a + 1.0) - gammaln(l + 1.0) - gammaln(a - l + 1.0)
        terms = log_binom + l * log_q + (a - l) * log_1q + log_excess[: a - 1]
        top = float(terms.max())
        log_sum = top + math.log(float(np.exp(terms - top).sum()))
        out[i] = float(np.logaddexp(0.0, log_sum)) / (a - 1)
    return np.minimum(out, base)


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(eps, delta) from an RDP curve at :data:`ORDERS`: Opacus' conversion (Balle et al. 2020)."""
    with quiet_opacus():
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(map(float, ORDERS)), rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=4096)
def subsampled_skellam_rdp(mu: float, l1: float, l2: float, sample_rate: float) -> np.ndarray:
    """RDP at :data:`ORDERS` of one Skellam mechanism run on a Poisson sample of the records
    at ``sample_rate`` (a DP-FedSGD round): :func:`poisson_subsampled_rdp` fed
    :func:`skellam_rdp`; at ``sample_rate`` 1 the Skellam mechanism itself (a release)."""
    if sample_rate >= 1.0:
        return skellam_rdp(mu, l1, l2)
    out = poisson_subsampled_rdp(lambda a: skellam_rdp(mu, l1, l2, a), sample_rate)
    out.setflags(write=False)  # cached: shared by every caller
    return out


def skellam_epsilon(mu: float, l1: float, l2: float, delta: float, sample_rate: float = 1.0,
                    steps: int = 1, prior: np.ndarray | None = None) -> float:
    """Epsilon of ``steps`` compositions of the (Poisson-subsampled at ``sample_rate``) Skellam
    mechanism, after mechanisms whose RDP at :data:`ORDERS` sums to ``prior`` (RDP composes
    by addition at every order, Mironov 2017, Prop. 1)."""
    rdp = subsampled_skellam_rdp(mu, l1, l2, sample_rate) * steps
    return rdp_epsilon(rdp if prior is None else rdp + prior, delta)


def calibrate_mu(*, epsilon: float, delta: float, l1: float, l2: float, sample_rate: float = 1.0,
                 steps: int = 1, prior: np.ndarray | None = None) -> float:
    """The smallest variance ``mu`` (to 0.01 %) such that ``steps`` rounds of the Skellam
    mechanism, each on a Poisson sample at ``sample_rate``, spend at most ``epsilon`` --
    composed with ``prior`` (RDP at :data:`ORDERS`; a release before DP-FedSGD) when given.
    Raises ValueError when ``prior`` alone leaves no room."""
    if prior is not None and rdp_epsilon(prior, delta) >= epsilon:
        raise ValueError(f"what was spent before already reaches epsilon {epsilon:g} at delta {delta:g}")

    def spent(mu: float) -> float:
        return skellam_epsilon(mu, l1, l2, delta, sample_rate, steps, prior)

    low, high = 1e-6 * l2 * l2, l2 * l2
    while spent(high) > epsilon:
        low, high = high, high * 4.0
        if high > 1e40:
            raise ValueError(f"no Skellam variance reaches epsilon {epsilon:g} at delta {delta:g}")
    while high - low > _CALIBRATION_TOLERANCE * high:
        mid = math.sqrt(low * high) if low > 0 else high / 2
        if spent(mid) > epsilon:
            low = mid
        else:
            high = mid
    return high


# -- the integer encoding ---------------------------------------------------------------

def rounded_l2_bound(norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """The L2 bound a rounded vector is held to: a vector of norm <= ``norm`` in ``dim``
    coordinates, randomly rounded, stays below it with probability >= 1 - beta (Kairouz et
    al. 2021, Thm 4.4), and never exceeds ``norm + sqrt(dim)``."""
    squared = norm * norm + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (norm + math.sqrt(dim) / 2.0)
    return min(norm + math.sqrt(dim), math.sqrt(squared))


def rounded_l1_bound(l2: float, dim: int) -> float:
    """An integer vector's L1 norm from its L2 bound: ``|v| <= v^2`` and Cauchy-Schwarz."""
    return l2 * min(math.sqrt(dim), l2)


def conditional_round(rows: Tensor, bound: float, generator: torch.Generator) -> Tensor:
    """Each row (already scaled) to integers by unbiased stochastic rounding, redrawn until
    its L2 norm is at most ``bound`` (conditional randomized rounding). float64 in and out.

    A coordinate ``x`` rounds up to ``floor(x) + 1`` iff a uniform draw ``u < x - floor(x)``,
    computed in place as ``floor(x) - floor(u - frac)`` (``u - frac`` is negative exactly
    when ``u < frac``: the sign of a float64 difference is exact), so the draws and the result
    are those of the plain ``floor(x) + (u < frac)``. The first draw covers every row without
    copying; only the rare rows above the bound are drawn again."""
    rows = rows.double()
    low = torch.floor(rows)
    frac = rows - low
    todo: Tensor | None = None  # None: every row
    out = low
    for _ in range(1000):
        f = frac if todo is None else frac[todo]
        cand = torch.rand(f.shape, generator=generator, dtype=torch.float64).to(rows.device)
        cand.sub_(f).floor_().neg_().add_(low if todo is None else low[todo])  # floor(x) + (u < frac)
        ok = cand.norm(dim=1) <= bound
        if todo is None:
            out = cand
            todo = torch.nonzero(~ok).flatten()
        else:
            out[todo[ok]] = cand[ok]
            todo = todo[~ok]
        if not len(todo):
            return out
    raise RuntimeError(f"conditional rounding: {len(todo)} rows still above the bound {bound:g} after 1000 draws")


def round_records(rows: Tensor, release: "DistributedRelease", generator: torch.Generator) -> Tensor:
    """Records' vectors (norm <= 1 up to float32 rounding) to the integers a site sums: in
    float64, projected to norm <= 1 (a float32 norm of 1 + 1e-7 would put a row out of the
    rounding bound's reach at a large scale), scaled by gamma and conditionally rounded."""
    rows = rows.double()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1.0)
    return conditional_round(rows * release.scale, release.l2, generator)


def skellam_noise(shape: tuple[int, ...], variance: float, rng: np.random.Generator) -> np.ndarray:
    """Skellam noise of ``variance`` per coordinate: Poisson(v/2) - Poisson(v/2), int64."""
    parts = max(1, math.ceil(variance / 2.0 / MAX_POISSON_RATE))  # a sum of Skellams is a Skellam
    if parts > 64:
        raise ValueError(f"a Skellam variance of {variance:.3g} needs {parts} draws of the exact sampler; "
                         "the plan keeps shares far below this")
    lam = variance / 2.0 / parts
    out = np.zeros(shape, dtype=np.int64)
    for _ in range(parts):
        out += rng.poisson(lam, size=shape).astype(np.int64) - rng.poisson(lam, size=shape).astype(np.int64)
    return out


def skellam_tail(variance: float, probability: float) -> float:
    """``s`` with ``P(|Sk(variance)| >= s) <= probability``: the exact Chernoff bound
    ``P(X >= s) <= exp(V (sqrt(1 + (s/V)^2) - 1) - s asinh(s/V))`` (MGF ``exp(V (cosh t - 1))``)."""
    target = math.log(probability / 2.0)

    def log_tail(s: float) -> float:
        r = s / variance
        return variance * (math.sqrt(1.0 + r * r) - 1.0) - s * math.asinh(r)

    low, high = 0.0, max(1.0, math.sqrt(variance))
    while log_tail(high) > target:
        low, high = high, high * 2.0
    for _ in range(100):
        mid = (low + high) / 2
        if log_tail(mid) > target:
            low = mid
        else:
            high = mid
    return high


class BitsTooSmall(ValueError):
    """The bit width leaves no scale at which the release is both fine enough and unwrapped."""


@dataclass(frozen=True)
class DistributedRelease:
    """The public parameters of one distributed Skellam release (the same at every site).

    ``scale``: gamma; ``dim``: coordinates of one record's vector (its class block);
    ``size``: coordinates of the whole statistic; ``mu``: the variance per coordinate the
    sum carries when exactly ``threshold`` sites' shares are in it; ``bits``: the modulus.

    DP-FedSGD (one private step per round, a DP-SGD family): ``dim`` = ``size`` = the private
    step's parameter count, one record's vector is its clipped gradient divided by the clip
    norm (norm <= 1), every site samples its records at ``sample_rate`` (Poisson) and
    ``mu`` is calibrated so that ``rounds`` such rounds spend the target; a release samples
    everyone once (``sample_rate`` 1, ``rounds`` 1). ``prior``: the public plan's ``(mu, l1,
    l2)`` of a Skellam release every site made before these rounds (a release warm start's
    round 1); the target covers it and these rounds together.
    """

    scale: float
    dim: int
    size: int
    mu: float
    threshold: int
    num_sites: int
    bits: int
    max_records: int
    sample_rate: float = 1.0
    rounds: int = 1
    prior: tuple[float, float, float] | None = None

    @property
    def prior_rdp(self) -> np.ndarray | None:
        """RDP at :data:`ORDERS` of the release before these rounds (None: nothing before)."""
        return None if self.prior is None else skellam_rdp(*self.prior)

    @property
    def l2(self) -> float:
        return rounded_l2_bound(self.scale, self.dim)

    @property
    def l1(self) -> float:
        return rounded_l1_bound(self.l2, self.dim)

    @property
    def share(self) -> float:
        """The variance each site adds: ``mu / threshold``."""
        return self.mu / self.threshold

    def epsilon(self, delta: float, mu: float | None = None) -> float:
        """Epsilon of the planned ``rounds`` after the ``prior`` release (at ``mu``, the planned
        variance by default)."""
        return skellam_epsilon(self.mu if mu is None else mu, self.l1, self.l2, delta, self.sample_rate, self.rounds,
                               self.prior_rdp)

    def site_share(self, target_epsilon: float, delta: float) -> tuple[float, float]:
        """A site's own share and the variance its records are then protected by: ``mu / t``,
        or more when the site's target is stricter (its policy wins): in the worst case the
        sum holds ``t - 1`` other shares of ``mu / t`` and this one. A ``prior`` release is
        counted at the plan's variance (a stricter site's own release carried more noise: the
        count is conservative). ValueError when the prior alone reaches the site's target."""
        if self.epsilon(delta) <= target_epsilon * (1 + 1e-9):
            return self.share, self.mu
        wanted = calibrate_mu(epsilon=target_epsilon, delta=delta, l1=self.l1, l2=self.l2,
                              sample_rate=self.sample_rate, steps=self.rounds, prior=self.prior_rdp)
        own = max(self.share, wanted - self.share * (self.threshold - 1))
        return own, own + self.share * (self.threshold - 1)

    def data_bound(self) -> float:
        """The largest |coordinate| the data part of the sum can reach."""
        return self.num_sites * self.max_records * self.l2

    def noise_bound(self) -> float:
        """|noise| per coordinate exceeded with probability at most OVERFLOW_PROBABILITY / size
        (every site's share in the sum)."""
        return skellam_tail(self.share * self.num_sites, OVERFLOW_PROBABILITY / max(self.size, 1))

    def fits(self) -> bool:
        """No wrap-around (but with OVERFLOW_PROBABILITY), an exact Poisson sampler, float64-exact scaling."""
        return (self.share / 2.0 <= MAX_POISSON_RATE and self.scale <= MAX_SCALE
                and self.data_bound() + self.noise_bound() < 2.0 ** (self.bits - 1))

    def to_json(self) -> str:
        d = asdict(self)
        if d["prior"] is None:  # the wire format of a plan without a prior stays as it was
            del d["prior"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DistributedRelease":
        d = json.loads(text)
        return cls(scale=float(d["scale"]), dim=int(d["dim"]), size=int(d["size"]), mu=float(d["mu"]),
                   threshold=int(d["threshold"]), num_sites=int(d["num_sites"]), bits=int(d["bits"]),
                   max_records=int(d["max_records"]), sample_rate=float(d.get("sample_rate", 1.0)),
                   rounds=int(d.get("rounds", 1)),
                   prior=None if d.get("prior") is None else _prior(d["prior"]))


def _prior(value) -> tuple[float, float, float]:
    mu, l1, l2 = (float(v) for v in value)
    if not all(math.isfinite(v) and v > 0 for v in (mu, l1, l2)):
        raise ValueError("a prior release needs a positive, finite (mu, l1, l2)")
    return mu, l1, l2


def plan_distributed_release(*, epsilon: float, delta: float, bits: int, num_sites: int, threshold: int,
                             max_records: int, dim: int, size: int, sample_rate: float = 1.0,
                             rounds: int = 1, prior: DistributedRelease | None = None) -> DistributedRelease:
    """The largest scale whose sum cannot wrap around (module docstring), and the variance
    calibrated to ``epsilon`` at that scale (for DP-FedSGD: ``rounds`` rounds, each on a
    Poisson sample at ``sample_rate``; a site's sampled records are at most its records, so
    ``max_records`` bounds the data part of the sum as for a release; after ``prior``, a
    planned release every site makes first, ``epsilon`` covers both). Raises :class:`BitsTooSmall` when even the
    coarsest useful scale (``gamma^2 >= dim``: rounding adds at most about a quarter to the
    squared sensitivity) does not fit."""

    before = None if prior is None else (prior.mu, prior.l1, prior.l2)
    prior_rdp = None if before is None else skellam_rdp(*before)

    def at(scale: float) -> DistributedRelease:
        l2 = rounded_l2_bound(scale, dim)
        mu = calibrate_mu(epsilon=epsilon, delta=delta, l1=rounded_l1_bound(l2, dim), l2=l2,
                          sample_rate=sample_rate, steps=rounds, prior=prior_rdp)
        return DistributedRelease(scale=scale, dim=dim, size=size, mu=mu, threshold=threshold,
                                  num_sites=num_sites, bits=bits, max_records=max_records,
                                  sample_rate=sample_rate, rounds=rounds, prior=before)

    coarsest = math.sqrt(dim)
    if not at(coarsest).fits():
        need = bits + math.ceil(math.log2(max((at(coarsest).data_bound() + at(coarsest).noise_bound())
                                              / 2.0 ** (bits - 1), 1.0))) + 1
        raise BitsTooSmall(f"{bits} bits cannot hold the sum of {num_sites} sites x {max_records} records with "
                           f"its noise at a useful scale; raise secure_aggregation.bits to at least {need}")
    low, high = coarsest, coarsest * 2.0
    while at(high).fits():
        low, high = high, high * 2.0
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        if at(mid).fits():
            low = mid
        else:
            high = mid
    return at(low)


# -- a site's side ----------------------------------------------------------------------

def site_spend(release: DistributedRelease, ledger) -> tuple[float, dict[str, float]] | None:
    """The Skellam share a site adds and the spend its ledger records (``{"mu", "l1", "l2"}``),
    or ``None`` when its budget cannot afford the release. The site's own target (its
    policy) wins: a stricter one makes it add a larger share (:meth:`DistributedRelease.site_share`)."""
    try:
        own, protected = release.site_share(ledger.target_epsilon, ledger.delta)
    except ValueError:  # the plan's prior release alone reaches the site's (stricter) target
        return None
    noise = skellam_tail(release.share * (release.num_sites - 1) + own, OVERFLOW_PROBABILITY / max(release.size, 1))
    if release.data_bound() + noise >= 2.0 ** (release.bits - 1) or own / 2.0 > 64 * MAX_POISSON_RATE:
        raise ValueError(f"site {ledger.site}: its target epsilon {ledger.target_epsilon:g} needs a noise share "
                         f"{own / release.share:.3g} times the planned one, more than the {release.bits}-bit sum "
                         "(or 64 draws of the exact sampler) can hold; align the site's policy with the scenario's "
                         "epsilon")
    spend = {"mu": protected, "l1": release.l1, "l2": release.l2}
    if ledger.epsilon_after(steps=1, noise_multiplier=1.0, sample_rate=release.sample_rate,
                            skellam=spend) > ledger.target_epsilon * (1 + 1e-6):
        return None
    return own, spend


def charge_distributed(ledger, spend: dict[str, float], *, round: int, run: str | int | None,
                       sample_rate: float = 1.0):
    """Record the release (or DP-FedSGD round, Poisson-sampled at ``sample_rate``) in the
    site's ledger: one Skellam mechanism (its Gaussian-equivalent noise multiplier
    ``sqrt(mu) / l2`` beside it, for reading)."""
    return ledger.record_round(round=round, steps=1, noise_multiplier=math.sqrt(spend["mu"]) / spend["l2"],
                               sample_rate=sample_rate, run=run, skellam=spend)


def noised_integer_sum(integer_sum: Tensor, own_share: float, generator: torch.Generator) -> np.ndarray:
    """The site's integer sum plus its Skellam share, drawn by a numpy generator seeded from
    ``generator`` (the site's secret one: OS entropy, privacy/randomness.py)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    exact = integer_sum.detach().cpu().double().numpy()
    if not np.all(exact == np.round(exact)) or np.abs(exact).max(initial=0) >= 2.0 ** 53:
        raise ValueError("the rounded release is not an exact integer vector")
    return exact.astype(np.int64) + skellam_noise(tuple(exact.shape), own_share, np.random.default_rng(seed))
