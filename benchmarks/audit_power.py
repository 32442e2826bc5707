"""Issue #22: does the audit have power? White-box Dirac canaries (privacy/audit/dirac.py)
and the calibrated membership verdicts on six trainings of one site:

    {no DP memorising, DP eps=1, DP eps=10, noise x 0.1, clipping off, known noise seed}

Each is a VAE on scikit-learn's digits (8x8, 64 values in [0, 1]) trained by the one local
training loop (client/training.py) for ROUNDS rounds; a canary sits on every parameter
coordinate of the model; the auditor reads the site's update of every round (what the
server receives). "No DP" is DP-SGD with sigma = 0 and no clipping, so the canaries can be
planted the same way; it has no claimed eps, and a positive bound there is a warning. The
broken variants claim eps = 1 (the ledger charges as if correct). Each row also runs
``run_audit`` on 500 samples with the model's per-record loss (the loss-threshold
membership attack), and reports its membership verdicts. With ``--shadows K`` it adds LiRA
exactly as ``fedgen audit --shadows K`` runs it (privacy/audit/shadows.py: candidates = the
250 training records and 250 held-out ones, K shadows of the same recipe on complementary
random halves, the membership family's level split between run_audit's attacks and LiRA).
Under a claim the membership verdicts test the claim (ok, or violation if an attack implies
more than the claimed eps), and the white-box canaries and the membership attacks share the
audit's 5 % violation level (report.violation_levels), as `fedgen audit` does.

The release rows: one mmd release (the Gaussian mechanism) of the 250 training digits, a
release canary on each of the 20,001 coordinates of the released sum
(privacy/audit/release_canaries.py), at eps = 1, 2, 10 and with ten times too little noise.

Each row is trained twice with the same settings: once with canaries (the white-box audit
run, which a site runs for the audit: a canary on every coordinate disturbs training), once
without (the normal run, whose model the membership audit examines). Cost: the seconds of
the white-box audit run over the normal run.

    OMP_NUM_THREADS=1 python benchmarks/audit_power.py [--rounds 5] [--steps 50] [--shadows 4] [--rows 0,2]
        [--batch 250 --out audit_power_q1.json]

Writes benchmarks/results/audit_power.json (or --out). With ``--batch 250`` (every record in
every step, q = 1) DP-SGD is exactly a Gaussian composition and the white-box verdict uses
the Gaussian-DP bound (dirac.gaussian_composition).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DELTA = 1e-5


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Training records and held-out records (disjoint)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:N_TRAIN]], x[order[N_TRAIN:N_TRAIN + 600]]


N_TRAIN = 250


def train_and_audit(name: str, *, epsilon: float | None, broken, rounds: int, steps: int, batch: int,
                    lr: float, hidden: int, canaries: bool = True, shadows: int = 0) -> dict:
    from fedgen.client.data import SiteData
    from fedgen.client.training import new_site_ledger, private_parameters, run_local_round
    from fedgen.contract.task import PrivacyConfig, TrainingConfig
    from fedgen.privacy.audit import AuditSettings, WhiteBoxScores, dirac, run_audit
    from fedgen.shared_models import Batch
    from fedgen.shared_models.vae import VAE

    train_x, holdout_x = _digits()
    training = TrainingConfig(local_steps=steps, batch_size=batch, lr=lr)
    privacy = PrivacyConfig(enabled=True, target_epsilon=epsilon or 1.0, delta=DELTA, max_grad_norm=1.0,
                            planned_rounds=rounds, grad_sample_mode="ghost")

    def train(x: torch.Tensor, plan=None, run_seed: int = 0):
        torch.manual_seed(0)  # one initialisation, as the run's own scenario seed gives every shadow federation
        model = VAE((64,), latent_dim=8, hidden=hidden)
        data = SiteData(x=x, y=None, num_classes=None, source="digits")
        ledger = new_site_ledger("0", privacy)
        params = private_parameters(model)
        updates = []
        for r in range(1, rounds + 1):
            before = torch.cat([p.detach().reshape(-1).clone() for p in params])
            run_local_round(model, data, training=training, privacy=privacy, ledger=ledger, server_round=r,
                            seed=r + 1000 * run_seed, white_box=plan, _broken=broken)
            updates.append((torch.cat([p.detach().reshape(-1) for p in params]) - before).numpy())
        return model, ledger, updates

    def minus_loss(model, x: torch.Tensor, draws: int = 4) -> np.ndarray:
        model.eval()
        step = next(s for s in model.steps() if s.private)
        with torch.no_grad():
            torch.manual_seed(2)
            return -np.mean([step.loss(Batch(x=x, y=None, size=len(x))).numpy() for _ in range(draws)], axis=0)

    torch.manual_seed(0)
    params0 = private_parameters(VAE((64,), latent_dim=8, hidden=hidden))
    shapes = [p.shape for p in params0]
    plan = dirac.plan(sum(p.numel() for p in params0)) if canaries else None
    start = time.perf_counter()
    model, ledger, updates = train(train_x, plan)
    seconds = time.perf_counter() - start
    row = {"run": name, "claimed_epsilon": epsilon, "seconds": round(seconds, 2),
           "accountant_epsilon": None if epsilon is None else ledger.epsilon,
           "noise_multiplier": ledger.noise_multiplier * (0 if epsilon is None else broken.noise_scale
                                                          if broken else 1)}
    if plan is None:  # the normal run: the membership audit of its model
        model.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            synthetic = model.sample(500).numpy()
        # as `fedgen audit --shadows` on the white-box audit run: with LiRA the membership family's
        # level is split, half for run_audit's attacks; under a claim the white-box canaries and the
        # membership attacks share the violation level (report.violation_levels)
        audit = run_audit(synthetic, train_x.numpy(), holdout_x.numpy(),
                          settings=AuditSettings(n_bootstrap=100, membership_share=0.5 if shadows else 1.0),
                          white_box_scores=WhiteBoxScores("minus loss", minus_loss(model, train_x),
                                                           minus_loss(model, holdout_x)),
                          claimed_epsilon=epsilon, delta=DELTA, white_box_canaries=epsilon is not None)
        wb = audit["white_box"]["white_box/minus loss"]
        membership = [v["level"] for v in audit["verdicts"] if v["topic"].startswith("membership")]
        level = audit["settings"]["membership_family_level"] * (0.5 if shadows else 1.0)
        if shadows:  # LiRA as `fedgen audit --shadows K` runs it (privacy/audit/shadows.py)
            from fedgen.privacy.audit import shadows as lira_
            from fedgen.privacy.audit.report import membership_verdict
            from fedgen.simulations.audit_shadows import STATISTIC_DRAWS

            cand = lira_.candidates(len(train_x), len(holdout_x), seed=0)
            records = torch.cat([train_x[cand.members], holdout_x[cand.nonmembers]])
            plan_in = lira_.shadow_plan(len(records), shadows, seed=0)
            draws = STATISTIC_DRAWS  # as simulations/audit_shadows.py
            stats = np.stack([minus_loss(train(records[torch.from_numpy(plan_in[k])], run_seed=k + 1)[0], records,
                                         draws) for k in range(shadows)])
            metrics = lira_.lira_audit(minus_loss(model, records, draws), stats, plan_in, cand.is_member,
                                       n_bootstrap=100, dp=None if epsilon is None else (DELTA, level))
            row.update({"lira_shadows": shadows, "lira_auc": round(metrics["auc"]["value"], 3),
                        "lira_tpr_at_1pct_fpr": round(metrics["tpr_at_fpr"][0]["value"], 3),
                        "lira_tpr_at_0.1pct_fpr": round(metrics["tpr_at_fpr"][1]["value"], 3),
                        "lira_auc_p_value": metrics["test"]["auc_p_value"],
                        "lira_top_k_p_value": metrics["test"]["top_k_p_value"],
                        "lira_implied_epsilon": (metrics.get("dp_test") or {}).get("epsilon_lower_bound"),
                        "lira_verdict": membership_verdict("LiRA", metrics, level=level,
                                                           claimed_epsilon=epsilon)["level"]})
            membership.append(row["lira_verdict"])
        row.update({"loss_attack_auc": round(wb["auc"]["value"], 3),
                    "loss_attack_tpr_at_1pct_fpr": round(wb["tpr_at_fpr"][0]["value"], 3),
                    "loss_attack_implied_epsilon": (wb.get("dp_test") or {}).get("epsilon_lower_bound"),
                    "membership_warnings": membership.count("warning"), "membership_ok": membership.count("ok"),
                    "membership_violations": membership.count("violation"),
                    "membership_verdict": next((lv for lv in ("violation", "warning") if lv in membership), "ok")})
        return row
    known = None
    if broken is not None and broken.known_noise_seed is not None:
        known = dirac.known_noise_replay(shapes, [steps] * rounds,
                                         [broken.known_noise_seed + r for r in range(1, rounds + 1)],
                                         noise_std=ledger.noise_multiplier * privacy.max_grad_norm / batch, lr=lr)
    # at sample rate 1 (batch >= records) DP-SGD is exactly a Gaussian composition: the
    # verdict uses the Gaussian-DP bound, as `fedgen audit` does (dirac.gaussian_composition)
    result = dirac.audit(dirac.scores(updates, plan, shapes, known_noise=known), plan.included, delta=DELTA,
                         confidence=_white_box_confidence(epsilon),
                         gaussian=epsilon is not None and dirac.gaussian_composition(ledger.history))
    if epsilon is None:  # nothing claimed: any positive bound is evidence of leakage
        level = "warning" if result.epsilon_lower_bound > 0 else "ok"
    else:
        level = dirac.verdict(result, epsilon)["level"]
    row.update({"canaries": result.m, **_bounds(result), "white_box_verdict": level})
    return row


def _white_box_confidence(epsilon: float | None) -> float:
    """The white-box canaries' confidence as `fedgen audit` sets it: under a claim, their share
    of the violation level beside the membership attacks (report.violation_levels)."""
    from fedgen.privacy.audit.report import violation_levels

    return 0.95 if epsilon is None else 1 - violation_levels(0.05, ["white_box_canaries", "membership"])[
        "white_box_canaries"]


def _bounds(result) -> dict:
    """Every one-run bound of a canary audit (privacy/audit/dirac.py, fdp.py): the verdict's
    (f-DP; for a Gaussian release its Gaussian-DP bound as an eps at delta), Steinke et al.'s
    and the Gaussian-DP one, with the guesses that gave the verdict's bound."""
    return {"white_box_bound": round(result.epsilon_lower_bound, 3), "bound_basis": result.basis,
            "max_attainable_bound": round(result.max_attainable, 3),
            "steinke_bound": round(result.steinke_epsilon_lower_bound, 3),
            "steinke_max_attainable": round(result.steinke_max_attainable, 3),
            "fdp_epsilon_delta_bound": round(result.fdp_epsilon_lower_bound, 3),
            "gdp_mu_bound": round(result.gdp_mu_lower_bound, 3),
            "gdp_epsilon_equivalent": round(result.gdp_epsilon_equivalent, 3),
            "correct": result.n_correct, "guesses": 2 * result.k}


def release_row(name: str, *, epsilon: float, noise_scale: float = 1.0, num_features: int = 20000) -> dict:
    """One mmd release (Gaussian mechanism) of the 250 training digits at one site, a
    release canary on every coordinate of the released sum (privacy/audit/release_canaries.py)."""
    from fedgen.client.data import SiteData
    from fedgen.client.training import _BrokenDP, new_site_ledger, run_local_round
    from fedgen.contract.task import PrivacyConfig, TrainingConfig
    from fedgen.privacy.audit import dirac, release_canaries
    from fedgen.shared_models import build_model

    train_x, _ = _digits()
    torch.manual_seed(0)
    model = build_model("mmd", data_shape=(64,), num_classes=None, architecture="mlp", num_features=num_features,
                        fit_steps=1)
    privacy = PrivacyConfig(enabled=True, target_epsilon=epsilon, delta=DELTA, max_grad_norm=1.0, planned_rounds=1)
    ledger = new_site_ledger("0", privacy)
    plan = dirac.plan(getattr(model, model.release_buffer).numel())
    start = time.perf_counter()
    run_local_round(model, SiteData(x=train_x, y=None, num_classes=None, source="digits"),
                    training=TrainingConfig(local_steps=1, batch_size=1, lr=1e-3), privacy=privacy, ledger=ledger,
                    server_round=1, seed=1, white_box=plan,
                    _broken=None if noise_scale == 1.0 else _BrokenDP(noise_scale=noise_scale))
    released = (getattr(model, model.release_buffer) * len(train_x)).numpy()
    score = release_canaries.scores([released], [model.statistic_sum(train_x, None).numpy()], plan,
                                    [ledger.noise_multiplier])
    result = dirac.audit(score, plan.included, delta=DELTA, gaussian=True, confidence=_white_box_confidence(epsilon))
    return {"run": name, "claimed_epsilon": epsilon, "accountant_epsilon": ledger.epsilon,
            "noise_multiplier": ledger.noise_multiplier * noise_scale, "canaries": result.m,
            **_bounds(result), "white_box_verdict": dirac.verdict(result, epsilon)["level"],
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> dict:
    from fedgen.client.training import _BrokenDP

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--shadows", type=int, default=0, help="LiRA shadow models per row (0: no LiRA)")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers (0-5) to run, '' for none; the others "
                                                 "keep their last results in the JSON file (the release rows always run)")
    ap.add_argument("--out", default="audit_power.json", help="file name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    kw = dict(rounds=args.rounds, steps=args.steps, batch=args.batch, lr=args.lr, hidden=args.hidden)
    runs = [("no DP, memorising", None, _BrokenDP(noise_scale=0.0)),
            ("DP eps=1", 1.0, None), ("DP eps=10", 10.0, None),
            ("noise x 0.1 (claims eps=1)", 1.0, _BrokenDP(noise_scale=0.1)),
            ("clipping off (claims eps=1)", 1.0, _BrokenDP(clip=False)),
            ("known noise seed (claims eps=1)", 1.0, _BrokenDP(known_noise_seed=12345))]
    out = REPO / "benchmarks" / "results" / args.out
    chosen = None if args.rows is None else {int(i) for i in args.rows.split(",") if i}
    previous = json.loads(out.read_text())["rows"] if chosen is not None and out.exists() else []
    rows = []
    for i, (name, eps, broken) in enumerate(runs):
        if chosen is not None and i not in chosen:
            if i < len(previous):
                rows.append(previous[i])
            continue
        white = train_and_audit(name, epsilon=eps, broken=broken, **kw)
        normal = train_and_audit(name, epsilon=eps, broken=broken, canaries=False, shadows=args.shadows, **kw)
        rows.append({**white, **{k: v for k, v in normal.items() if k != "seconds"},
                     "seconds_normal_run": normal["seconds"], "seconds_white_box_run": white.pop("seconds")})
        rows[-1].pop("seconds", None)
        print(json.dumps(rows[-1]), flush=True)
    release_rows = [release_row("mmd release, DP eps=1", epsilon=1.0), release_row("mmd release, DP eps=2", epsilon=2.0),
                    release_row("mmd release, DP eps=10", epsilon=10.0),
                    release_row("mmd release, noise x 0.1 (claims eps=1)", epsilon=1.0, noise_scale=0.1)]
    for row in release_rows:
        print(json.dumps(row), flush=True)
    ratios = [r["seconds_white_box_run"] / r["seconds_normal_run"] for r in rows] or [float("nan")]
    result = {"benchmark": "audit_power", "settings": {**kw, "shadows": args.shadows, "n_train": N_TRAIN, "delta": DELTA,
                                                       "data": "sklearn digits 8x8", "model": "VAE mlp latent 8"},
              "rows": rows, "release_rows": release_rows, "cost": {"white_box_over_normal_run_max": round(max(ratios), 2),
                                     "white_box_over_normal_run_median": round(float(np.median(ratios)), 2)},
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    from fedgen.privacy.ledger import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1))
    print(json.dumps(result["cost"]))
    return result


if __name__ == "__main__":
    main()
