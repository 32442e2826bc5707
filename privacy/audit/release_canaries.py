"""White-box canaries for the release families (mmd; any family whose site publishes one
Gaussian-noised sum of per-record vectors of norm <= 1, privacy/release.py).

In a white-box audit run (``privacy.white_box``) at a release family's site:

* On its first release the site picks ``m`` distinct coordinates of the released
  statistic (the embedding space, ``[classes, features + 1]`` for mmd) and gives each a
  secret bit from the OS's entropy (included with probability 1/2); both are kept in
  ``white_box_release_canaries.npz`` beside its ledger (:func:`load_or_plan`).
* A canary is a crafted record whose vector is the unit vector on its coordinate: a
  contribution at the sensitivity bound (norm 1), orthogonal to every other canary. The
  included canaries' vectors are added to the site's sum *before* the noise
  (:func:`canary_sum`): under a correct release each is one more record, covered by the
  accountant.
* The site keeps, per release, the raw release that leaves it and its records' own sum
  (without canaries, never sent): ``white_box_releases/round_NNNNN.npz``
  (:func:`record_release`). The server keeps the raw release it receives
  (``RUN_DIR/white_box_received/<site>/``), which the auditor reads instead when present.
* A canary's score is the release minus the records' sum on its coordinate: 1 + noise if
  included, noise if not (:func:`scores`). The records' sum does not depend on the bits, so
  subtracting it (an adversary who knows every other record: the one DP protects against)
  keeps the bound valid, and leaves exactly the Gaussian mechanism to test.
* Guesses and the bound: the one-run machinery of :mod:`.dirac` (three pre-declared guess
  budgets, Bonferroni). The release is a Gaussian mechanism, exactly mu-GDP with
  ``mu = sqrt(sum 1/sigma_r^2)``, so the verdict uses the f-DP test of Gaussian DP
  (Mahloujifar, Melis & Chaudhuri 2024), as its ε-equivalent at δ: much tighter than
  Steinke et al.'s (ε, δ) theorem, which is reported beside it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .dirac import DiracCanaries, audit
from .dirac import load_or_plan as dirac_load_or_plan

FILE_NAME = "white_box_release_canaries.npz"
RELEASES_DIR = "white_box_releases"


def load_or_plan(path: Path, n_coordinates: int, m: int) -> DiracCanaries:
    """The site's release canaries: planned on its first audited release, the same ones after."""
    return dirac_load_or_plan(path, n_coordinates, m, what="release canaries")


def canary_sum(canaries: DiracCanaries, like: torch.Tensor) -> torch.Tensor:
    """The included canaries' vectors summed, in the statistic's shape: 1 on each included
    canary's coordinate (each vector has norm 1, the sensitivity bound)."""
    flat = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    flat[torch.as_tensor(canaries.coordinates[canaries.included], device=like.device)] = 1.0
    return flat.reshape(like.shape)


def record_release(state_dir: Path, server_round: int, *, released: np.ndarray,
                   records_sum: np.ndarray | None = None) -> None:
    """Keep a release for the auditor (``RELEASES_DIR/round_NNNNN.npz``): the raw noisy sum
    that left the site and, at the site, its records' own sum."""
    from fedgen.privacy.ledger import atomic_write

    arrays = {"released": np.asarray(released, dtype=np.float64), "round": server_round}
    if records_sum is not None:
        arrays["records_sum"] = np.asarray(records_sum, dtype=np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(Path(state_dir) / RELEASES_DIR / f"round_{server_round:05d}.npz",
                 lambda fh: fh.write(buffer.getvalue()))


def read_releases(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    out = {}
    for f in sorted((Path(folder) / RELEASES_DIR).glob("round_*.npz")):
        with np.load(f) as z:
            out[int(z["round"])] = {k: z[k] for k in z.files if k != "round"}
    return out


def scores(released: Sequence[np.ndarray], records_sum: Sequence[np.ndarray], canaries: DiracCanaries,
           noise_multipliers: Sequence[float]) -> np.ndarray:
    """Per-canary scores (higher = more likely included): over the releases, the release
    minus the records' sum on the canary's coordinate, in units of each release's noise
    std, summed with weights 1/sigma (the likelihood ratio's sufficient statistic)."""
    total = np.zeros(canaries.m)
    for r, s, sigma in zip(released, records_sum, noise_multipliers):
        diff = (np.asarray(r, dtype=np.float64) - np.asarray(s, dtype=np.float64)).reshape(-1)[canaries.coordinates]
        total += diff / max(float(sigma), 1e-12) ** 2
    return total


def audit_state_dir(state_dir: Path, *, sigmas: dict[int, float], delta: float, confidence: float = 0.95,
                    received_dir: Path | None = None):
    """``(DiracAudit, rounds read, source)`` of a site's release canaries, or None when the
    folder holds no release audit. ``sigmas``: each round's noise multiplier (the ledger)."""
    path = Path(state_dir) / FILE_NAME
    site = read_releases(state_dir)
    if not path.exists() or not site:
        return None
    received = read_releases(received_dir) if received_dir is not None else {}
    source = "server (the releases it received)" if received else "site (its copy of the releases it sent)"
    rounds = sorted(site)
    released = [(received.get(r) or site[r])["released"] for r in rounds]
    from .dirac import load

    canaries = load(path)
    s = scores(released, [site[r]["records_sum"] for r in rounds], canaries,
               [sigmas.get(r, 0.0) or 1e-12 for r in rounds])
    return audit(s, canaries.included, delta=delta, confidence=confidence, gaussian=True), len(rounds), source


def audit_site(state_dir: Path, *, claimed_epsilon: float | None, delta: float, confidence: float = 0.95,
               received_dir: Path | None = None) -> tuple[dict, dict] | None:
    """The release-canary audit of a site's state folder: ``(result dict, verdict)``, or
    None when it holds none. Each release's sigma comes from the site's ledger there."""
    from fedgen.privacy.ledger import SiteLedger

    from .dirac import verdict

    ledger_path = Path(state_dir) / "ledger.json"
    sigmas = {}
    if ledger_path.exists():
        for h in SiteLedger.from_json(ledger_path.read_text()).history:
            sigmas[h.round] = float(h.noise_multiplier or 0.0)
    found = audit_state_dir(state_dir, sigmas=sigmas, delta=delta, confidence=confidence, received_dir=received_dir)
    if found is None:
        return None
    result, rounds, source = found
    out = {**result.to_dict(), "state_dir": str(state_dir), "rounds_read": rounds, "updates_read_from": source,
           "claimed_epsilon": claimed_epsilon, "kind": "release canaries"}
    out["epsilon_lower_bound"]["method"] = ("Mahloujifar, Melis & Chaudhuri 2024 (f-DP in one run), the Gaussian-DP "
                                            "curve as its ε at δ: the release is a Gaussian mechanism, exactly "
                                            "mu-GDP; release canaries (unit vectors on distinct coordinates of the "
                                            "released sum) read from the raw release; three guess budgets, Bonferroni")
    if claimed_epsilon is None:
        level = "warning" if result.epsilon_lower_bound > 0 else "ok"
        return out, {"level": level, "topic": "white_box_canaries",
                     "text": f"Release canaries without a DP claim: ε lower bound {result.epsilon_lower_bound:.3g}."}
    return out, verdict(result, claimed_epsilon)
