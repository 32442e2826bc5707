"""White-box Dirac (gradient-space) canaries for DP-SGD, and the one-run ε lower bound
read from the updates the server receives.

After Steinke, Nasr & Jagielski (2023, "Privacy auditing with one (1) training run",
NeurIPS; the white-box gradient-canary setting of their Sec. 7) and Nasr et al. (2023,
"Tight auditing of differentially private machine learning", USENIX Security: Dirac
gradient canaries).

Protocol, at one site, for an audit run (scenario ``privacy.white_box: {canaries: m}``):

* ``m`` canaries, each a gradient vector that is zero except on one parameter coordinate
  (the coordinates distinct, drawn at random). Each gets a secret bit from the OS's
  entropy (included with probability 1/2); coordinates and bits are kept in the site's
  ``white_box_canaries.npz`` beside its ledger (:func:`save`, :func:`load`).
* In every DP-SGD step an included canary is sampled like a record: with the step's
  Poisson rate ``q``. A sampled canary's gradient -- ``CANARY_NORM`` on its coordinate,
  a crafted outlier -- is clipped to the step's clip norm C like any example and added
  to the summed clipped gradient *before* the noise (:func:`attach`, the one hook in
  client/training.py). Under correct DP-SGD it is one more record of gradient norm C,
  covered by the accountant: the audit tests exactly the claimed guarantee.
* The auditor sees the site's update of every round (what the server receives). The
  score of a canary is minus the sum over rounds of the update on its coordinate (a
  gradient step moves against the gradient), with the coordinate's background movement
  removed: the median over its parameter tensor, scaled by the tensor's median absolute
  deviation (:func:`scores`). Every quantity is a function of the output and of public
  facts only, so the bound keeps its confidence.
* Guesses: "included" for the ``k`` highest scores, "excluded" for the ``k`` lowest, at
  three guess budgets fixed in advance (:data:`GUESS_FRACTIONS`), each tested at a third
  of the level (Bonferroni); the bound is the largest. The third budget guesses on every
  canary: the only one whose perfect outcome can exceed a claim of ε = 10 with one canary
  per parameter of a small model (171,088: at most 9.1 with 10 % per side, 10.6 with all),
  so such a claim can be refuted at all; it fires only when nearly every canary is told
  apart (clipping off). The count of correct guesses is turned into
  a bound by the f-DP test of Mahloujifar, Melis & Chaudhuri (2024, :mod:`.fdp`) on the
  (ε, δ) curve (the verdict's), and reported beside it: Steinke et al.'s (ε, δ) theorem
  and the Gaussian-DP bound (the verdict's for a Gaussian release and for DP-SGD at sample rate 1,
  :func:`gaussian_composition`; ``gaussian=True``). :func:`audit` also reports the largest
  bound this number of canaries could give at all (every guess right): if it is below
  the claimed ε, no outcome of this audit could refute the claim.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .canaries import count_correct, epsilon_from_counts

FILE_NAME = "white_box_canaries.npz"
CANARY_NORM = 1e3  # the crafted gradient's size before clipping (a gross outlier)
GUESS_FRACTIONS = (0.01, 0.1, 0.5)  # k = fraction x m guesses on each side, pre-declared


@dataclass(frozen=True)
class DiracCanaries:
    """``m`` Dirac canaries: flat coordinates into the private parameters and secret bits."""

    coordinates: np.ndarray  # int64, distinct
    included: np.ndarray  # bool

    @property
    def m(self) -> int:
        return len(self.coordinates)


def plan(n_coordinates: int, m: int | None = None) -> DiracCanaries:
    """``m`` canaries (default: one on every coordinate) on distinct coordinates, with bits
    from the OS's entropy (never a seed the server could know)."""
    m = n_coordinates if m is None else m
    if not 1 <= m <= n_coordinates:
        raise ValueError(f"white-box canaries: need 1 <= canaries <= {n_coordinates} (the model's "
                         f"trainable parameters of its private steps), got {m}")
    rng = np.random.default_rng()  # OS entropy
    coords = np.sort(rng.choice(n_coordinates, m, replace=False)).astype(np.int64)
    return DiracCanaries(coordinates=coords, included=rng.random(m) < 0.5)


def save(path: Path, canaries: DiracCanaries) -> None:
    """Write the site's canary file atomically."""
    from fedgen.privacy.ledger import atomic_write

    buffer = io.BytesIO()
    np.savez(buffer, coordinates=canaries.coordinates, included=canaries.included)
    atomic_write(Path(path), lambda fh: fh.write(buffer.getvalue()))


def load(path: Path) -> DiracCanaries:
    with np.load(Path(path)) as f:
        return DiracCanaries(coordinates=f["coordinates"].astype(np.int64),
                             included=f["included"].astype(bool))


def load_or_plan(path: Path, n_coordinates: int, m: int, *, what: str = "white-box canaries") -> DiracCanaries:
    """The site's canaries: planned on its first audit round, the same ones afterwards
    (``what``: their name in the error; release canaries use the same file format)."""
    path = Path(path)
    if path.exists():
        canaries = load(path)
        if canaries.m != m or canaries.coordinates.max() >= n_coordinates:
            raise ValueError(f"{path} holds {canaries.m} {what} for another model or "
                             f"count (scenario asks {m}); remove it to start a new audit run")
        return canaries
    canaries = plan(n_coordinates, m)
    save(path, canaries)
    return canaries


UPDATES_DIR = "white_box_updates"


def flat(params: Sequence[torch.Tensor]) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1).cpu() for p in params]).double().numpy()


def record_update(state_dir: Path, server_round: int, update: np.ndarray,
                  shapes: Sequence[Sequence[int]]) -> None:
    """Keep the update of the private parameters that the site sends this round (what the
    server receives), for the auditor: ``white_box_updates/round_NNNNN.npz``."""
    buffer = io.BytesIO()
    np.savez(buffer, update=np.asarray(update, dtype=np.float64), round=server_round,
             shapes=np.array([list(s) + [0] * (8 - len(s)) for s in shapes], dtype=np.int64),
             ndims=np.array([len(s) for s in shapes], dtype=np.int64))
    from fedgen.privacy.ledger import atomic_write

    atomic_write(Path(state_dir) / UPDATES_DIR / f"round_{server_round:05d}.npz",
                 lambda fh: fh.write(buffer.getvalue()))


#: In a white-box audit run (never a normal run, never under secure aggregation) the server
#: keeps every update it receives from the audited site: ``RUN_DIR/white_box_received/<site>/``,
#: in the site's own format (:func:`record_update`). The auditor reads these when present.
RECEIVED_DIR = "white_box_received"


def private_parameter_names(model) -> list[str]:
    """Names (``model.state_dict()`` keys) of the trainable parameters of the model's
    private steps, in step order: the flat coordinate space of the canaries, as the site
    builds it (``client.training.private_parameters``), for the server's copy."""
    if not hasattr(model, "steps"):  # a release family: no DP-SGD steps, no gradient canaries
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    out = []
    for step in model.steps():
        if step.private and id(step.module) not in seen:
            seen.add(id(step.module))
            out += [names[id(p)] for p in step.module.parameters() if p.requires_grad]
    return out


def record_received(run_dir: Path, site: str, server_round: int, received: dict, sent: dict,
                    names: Sequence[str]) -> None:
    """The server's copy of a white-box audit site's update (``received - sent`` on the
    private parameters ``names``), kept under ``run_dir/RECEIVED_DIR/<site>/``."""
    if not names:
        return
    update = np.concatenate([(np.asarray(received[n], dtype=np.float64) - np.asarray(sent[n], dtype=np.float64))
                             .reshape(-1) for n in names])
    record_update(Path(run_dir) / RECEIVED_DIR / site, server_round, update,
                  [tuple(np.asarray(sent[n]).shape) for n in names])


def read_updates(state_dir: Path) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
    """Every recorded update of a white-box audit run (round order) and the tensor shapes."""
    files = sorted((Path(state_dir) / UPDATES_DIR).glob("round_*.npz"))
    updates, shapes = [], []
    for f in files:
        with np.load(f) as z:
            updates.append(z["update"])
            shapes = [tuple(int(v) for v in row[:n]) for row, n in zip(z["shapes"], z["ndims"])]
    return updates, shapes


def gaussian_composition(history) -> bool:
    """True when a site's DP-SGD history (its ledger's ``RoundSpend`` entries) is exactly a
    composition of Gaussian mechanisms: every charged entry that took steps ran at sample
    rate 1 with noise, and none is a Skellam release. Each such step adds N(0, (sigma C)^2)
    to a sum of sensitivity C over the whole data (no subsampling), so it is exactly
    1/sigma-GDP, and T of them, chosen adaptively, are exactly sqrt(T)/sigma-GDP (Dong, Roth
    & Su 2022, Corollary 3.3). Every accountant's ε at δ is then at least that curve's, so
    the Gaussian-DP bound tests the claim soundly (``audit(..., gaussian=True)``). With
    q < 1 the subsampled mechanism is not Gaussian, and only the (ε, δ) curve is sound."""
    from ..ledger import charged

    spent = [h for h in charged(history) if h.steps > 0]
    return bool(spent) and all(float(h.sample_rate) >= 1.0 and float(h.noise_multiplier) > 0 and not h.skellam
                               for h in spent)


def audit_state_dir(state_dir: Path, *, claimed_epsilon: float | None, delta: float,
                    confidence: float = 0.95, received_dir: Path | None = None,
                    gaussian: bool = False) -> tuple[dict, dict] | None:
    """The white-box audit of a site's state folder (its canaries and recorded updates):
    ``(result dict, verdict)``, or None when the folder holds no white-box audit run.
    ``received_dir``: the server's copy of the updates (:data:`RECEIVED_DIR`), read instead
    of the site's own when it holds any. ``gaussian``: the site's DP-SGD is exactly a
    Gaussian composition (:func:`gaussian_composition` of its ledger), so the verdict uses
    the Gaussian-DP bound."""
    path = Path(state_dir) / FILE_NAME
    updates, shapes = read_updates(received_dir) if received_dir is not None else ([], [])
    source = "server (the updates it received)"
    if not updates:
        updates, shapes = read_updates(state_dir)
        source = "site (its copy of the updates it sent)"
    if not path.exists() or not updates:
        return None
    canaries = load(path)
    result = audit(scores(updates, canaries, shapes), canaries.included, delta=delta, confidence=confidence,
                   gaussian=gaussian and claimed_epsilon is not None)
    out = {**result.to_dict(), "state_dir": str(state_dir), "rounds_read": len(updates),
           "updates_read_from": source, "claimed_epsilon": claimed_epsilon}
    if claimed_epsilon is None:
        level = "warning" if result.epsilon_lower_bound > 0 else "ok"
        text = (f"White-box canaries without a DP claim: ε lower bound {result.epsilon_lower_bound:.3g} "
                f"({result.n_correct} of {2 * result.k} guesses correct, m = {result.m})"
                + (" — the canaries are memorised: the training leaks." if level == "warning" else "."))
        return out, {"level": level, "topic": "white_box_canaries", "text": text}
    return out, verdict(result, claimed_epsilon)


def attach(optimizer, params: Sequence[torch.Tensor], offsets: Sequence[int],
           canaries: DiracCanaries, *, sample_rate: float, generator: torch.Generator | None) -> None:
    """Hook ``canaries`` into an Opacus DP optimizer: before its noise, each included canary
    whose coordinate lies in ``params`` (flat offsets ``offsets`` into the private
    parameters) is sampled with probability ``sample_rate`` and its gradient, clipped to the
    optimizer's ``max_grad_norm``, added to the summed clipped gradient."""
    included = canaries.coordinates[canaries.included]
    local = []
    for p, start in zip(params, offsets):
        sel = included[(included >= start) & (included < start + p.numel())] - start
        local.append(torch.as_tensor(sel, dtype=torch.long, device=p.device))
    add_noise = optimizer.add_noise

    def add_canaries_then_noise() -> None:
        value = min(CANARY_NORM, float(optimizer.max_grad_norm))
        for p, idx in zip(params, local):
            if len(idx) == 0 or p.summed_grad is None:
                continue
            draw = torch.rand(len(idx), generator=generator, device="cpu") < sample_rate
            chosen = idx[draw.to(idx.device)]
            p.summed_grad.view(-1).index_add_(
                0, chosen, torch.full((len(chosen),), value, dtype=p.summed_grad.dtype, device=p.device))
        add_noise()

    optimizer.add_noise = add_canaries_then_noise


def flat_offsets(params: Sequence[torch.Tensor]) -> list[int]:
    return [0, *np.cumsum([p.numel() for p in params])[:-1].tolist()]


def tensor_slices(shapes: Sequence[Sequence[int]]) -> list[slice]:
    sizes = [int(np.prod(s)) for s in shapes]
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def scores(updates: Sequence[np.ndarray], canaries: DiracCanaries, shapes: Sequence[Sequence[int]],
           *, known_noise: np.ndarray | None = None) -> np.ndarray:
    """Per-canary scores (higher = more likely included) from the site's per-round updates
    (flat, the private parameters in order): minus their sum, less ``known_noise`` (an
    auditor's prediction of that from noise it can regenerate, :func:`known_noise_replay`,
    every coordinate) if given, standardised per parameter tensor (median, median absolute
    deviation: the background movement of a coordinate without a canary)."""
    total = -np.sum([np.asarray(u, dtype=np.float64).reshape(-1) for u in updates], axis=0)
    if known_noise is not None:
        total = total - np.asarray(known_noise, dtype=np.float64).reshape(-1)
    standard = np.empty_like(total)
    for sl in tensor_slices(shapes):
        part = total[sl]
        centre = np.median(part)
        spread = np.median(np.abs(part - centre)) or (np.std(part) or 1.0)
        standard[sl] = (part - centre) / spread
    return standard[canaries.coordinates]


def known_noise_replay(shapes: Sequence[Sequence[int]], steps_per_round: Sequence[int],
                       round_seeds: Sequence[int], *, noise_std: float, lr: float,
                       betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8) -> np.ndarray:
    """What an auditor who knows the noise seeds predicts for the score (minus the summed
    update) of every coordinate from the DP noise alone: the noise regenerated (one
    ``torch.Generator`` per round seeded with its seed, one draw per parameter tensor per
    DP step in parameter order: Opacus' draw order), scaled to the update's units
    (``noise_std`` = sigma C / expected batch size) and replayed through the round's fresh
    Adam. Only an implementation that leaks its noise seed lets an auditor do this."""
    slices = tensor_slices(shapes)
    total = np.zeros(slices[-1].stop)
    b1, b2 = betas
    for steps, seed in zip(steps_per_round, round_seeds):
        g = torch.Generator().manual_seed(int(seed))
        m1, m2 = np.zeros_like(total), np.zeros_like(total)
        for t in range(1, int(steps) + 1):
            z = np.concatenate([torch.normal(0.0, 1.0, size=tuple(shape), generator=g).reshape(-1).double().numpy()
                                for shape in shapes]) * noise_std
            m1 = b1 * m1 + (1 - b1) * z
            m2 = b2 * m2 + (1 - b2) * z * z
            total += lr * (m1 / (1 - b1 ** t)) / (np.sqrt(m2 / (1 - b2 ** t)) + adam_eps)
    return total


@dataclass(frozen=True)
class DiracAudit:
    """The one-run bounds of a canary audit. ``epsilon_lower_bound`` and ``max_attainable``
    are the verdict's: the f-DP test (Mahloujifar, Melis & Chaudhuri 2024, :mod:`.fdp`) of
    the (ε, δ) curve, or, for a Gaussian mechanism (``basis == "gdp"``), the ε-equivalent
    of its Gaussian-DP bound. Steinke et al.'s bound and the GDP bound are reported beside."""

    epsilon_lower_bound: float
    max_attainable: float  # every guess right, at the better budget
    m: int
    k: int  # guesses on each side at the budget that gave the bound
    n_correct: int
    delta: float
    confidence: float
    steinke_epsilon_lower_bound: float = 0.0  # Steinke, Nasr & Jagielski 2023, same guesses
    steinke_max_attainable: float = 0.0
    fdp_epsilon_lower_bound: float = 0.0  # f-DP test of the (ε, δ) curve
    gdp_mu_lower_bound: float = 0.0  # f-DP test of Gaussian DP
    gdp_epsilon_equivalent: float = 0.0  # its ε at δ
    basis: str = "epsilon-delta"  # which bound the verdict uses: "epsilon-delta" or "gdp"

    def to_dict(self) -> dict:
        from .results import INFORMATIONAL, LOWER_IS_PRIVATE, described

        method = ("Mahloujifar, Melis & Chaudhuri 2024 (f-DP in one run), "
                  + ("Gaussian-DP curve, as its ε at δ" if self.basis == "gdp" else "the (ε, δ) curve")
                  + "; Dirac gradient canaries read from every round's update; three guess budgets, Bonferroni")
        return {
            "epsilon_lower_bound": described(
                "white_box_epsilon_lower_bound", self.epsilon_lower_bound, direction=LOWER_IS_PRIVATE,
                units="epsilon (nats)", confidence=self.confidence, delta=self.delta, method=method),
            "max_attainable_bound": self.max_attainable,
            "bound_basis": self.basis,
            "steinke_epsilon_lower_bound": described(
                "white_box_steinke_epsilon_lower_bound", self.steinke_epsilon_lower_bound, direction=INFORMATIONAL,
                units="epsilon (nats)", confidence=self.confidence, delta=self.delta,
                method="Steinke, Nasr & Jagielski 2023 (the (ε, δ) theorem), the same guesses"),
            "steinke_max_attainable_bound": self.steinke_max_attainable,
            "fdp_epsilon_lower_bound": self.fdp_epsilon_lower_bound,
            "gdp_mu_lower_bound": described(
                "white_box_gdp_mu_lower_bound", self.gdp_mu_lower_bound, direction=INFORMATIONAL,
                units="mu (Gaussian DP)", confidence=self.confidence,
                method="f-DP in one run: the largest mu for which mu-GDP is rejected"),
            "gdp_epsilon_equivalent": self.gdp_epsilon_equivalent,
            "m": self.m, "k_plus": self.k, "k_minus": self.k, "n_guesses": 2 * self.k,
            "n_correct": self.n_correct, "guess_fractions": list(GUESS_FRACTIONS),
        }


def audit(score: np.ndarray, included: np.ndarray, *, delta: float,
          confidence: float = 0.95, gaussian: bool = False) -> DiracAudit:
    """The ε lower bounds from canary scores: every pre-declared guess budget, each at
    level ``(1 - confidence) / len(GUESS_FRACTIONS)``; per method the largest bound and the
    largest attainable one. The verdict's bound is the f-DP test of the (ε, δ) curve (sound against any
    (ε, δ) claim) or, with ``gaussian`` (a Gaussian mechanism, exactly mu-GDP, whose claim
    is that curve), the ε-equivalent of the Gaussian-DP bound."""
    from . import fdp

    score = np.asarray(score, dtype=np.float64).reshape(-1)
    m = len(score)
    beta = (1 - confidence) / len(GUESS_FRACTIONS)
    best: dict[str, tuple[float, int, int]] = {}
    tops = {"steinke": 0.0, "fdp": 0.0, "gdp": 0.0}
    for fraction in GUESS_FRACTIONS:
        k = max(1, min(m // 2, int(round(fraction * m))))
        v = count_correct(score, included, k_plus=k, k_minus=k)
        bounds = {"steinke": lambda c: epsilon_from_counts(m, 2 * k, c, delta=delta, confidence=1 - beta),
                  "fdp": lambda c: fdp.epsdelta_lower_bound(m, 2 * k, c, delta=delta, beta=beta),
                  "gdp": lambda c: fdp.gdp_lower_bound(m, 2 * k, c, beta=beta)}
        for name, bound in bounds.items():
            value = bound(v)
            tops[name] = max(tops[name], bound(2 * k))
            if name not in best or value > best[name][0]:
                best[name] = (value, k, v)
    gdp_eps, gdp_top = fdp.gdp_epsilon(best["gdp"][0], delta), fdp.gdp_epsilon(tops["gdp"], delta)
    chosen, top = (("gdp", gdp_eps), gdp_top) if gaussian else (("fdp", best["fdp"][0]), tops["fdp"])
    _, k, v = best[chosen[0]]
    return DiracAudit(epsilon_lower_bound=chosen[1], max_attainable=top, m=m, k=k, n_correct=v, delta=delta,
                      confidence=confidence, steinke_epsilon_lower_bound=best["steinke"][0],
                      steinke_max_attainable=tops["steinke"], fdp_epsilon_lower_bound=best["fdp"][0],
                      gdp_mu_lower_bound=best["gdp"][0], gdp_epsilon_equivalent=gdp_eps,
                      basis="gdp" if gaussian else "epsilon-delta")


def verdict(result: DiracAudit, claimed_epsilon: float) -> dict:
    """violation iff the bound exceeds the claim; inconclusive when even a perfect guess
    could not have exceeded it; ok otherwise."""
    basis = "Gaussian-DP" if result.basis == "gdp" else "f-DP"
    what = (f"white-box canary ε lower bound {result.epsilon_lower_bound:.3g} ({basis}, "
            f"{100 * result.confidence:g} % confidence, δ = {result.delta:.2g}; {result.n_correct} of "
            f"{2 * result.k} guesses correct, m = {result.m}; at most {result.max_attainable:.3g} "
            f"attainable with this many canaries; Steinke et al.'s bound {result.steinke_epsilon_lower_bound:.3g})")
    if result.epsilon_lower_bound > claimed_epsilon:
        return {"level": "violation", "topic": "white_box_canaries",
                "text": f"The privacy accounting or implementation is broken: the {what} exceeds the "
                        f"claimed ε = {claimed_epsilon:.3g}. Do not release data from this run."}
    if result.max_attainable <= claimed_epsilon:
        return {"level": "inconclusive", "topic": "white_box_canaries",
                "text": f"The {what} cannot refute the claimed ε = {claimed_epsilon:.3g} at this "
                        "audit size: even every guess right would not exceed it. Use more "
                        "canaries (or a larger model) to test this claim."}
    return {"level": "ok", "topic": "white_box_canaries",
            "text": f"The {what} does not exceed the claimed ε = {claimed_epsilon:.3g}: consistent "
                    "with the privacy accounting (an audit can refute a claim, never prove it)."}
