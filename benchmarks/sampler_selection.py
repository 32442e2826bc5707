"""Choose a trained model's sampling knobs on a validation half, report them on the test half.

A sampler's settings -- the diffusion model's classifier-free guidance scale ``guidance_scale``,
its DDIM stochasticity ``ddim_eta`` and step count ``sample_steps``, the flow's ``temperature``
-- change what a trained model's samples are worth, and they cost no privacy (post-processing
of a released model). Choosing them by the reported TSTR would flatter the figure (the best of
many draws on one test set); this script keeps the two apart. The held-out reference of a run
is split as TSTR splits it: the real-test half is what TSTR reports on, and the *real-train*
half -- which TSTR never tests on (only TRTR trains on it) -- is the validation set. For every
setting of the grid the run's own evaluation draws (:func:`fedgen.server.evaluate.evaluation_draws`:
same sample count, same ``round_seed``) go through TSTR itself
(:func:`fedgen.evaluation.tstr.train_synthetic_test_real`, the run's seed), whose classifier is
also scored on the validation half; the setting with the best validation accuracy is chosen, and
its test accuracy is the figure to report (it equals what ``fedgen simulate`` reports with that
setting in the scenario's ``model`` block). Every setting's test accuracy is written beside it
for the record, never used to choose.

    python benchmarks/sampler_selection.py RUN --round 11 \
        --grid guidance_scale=1,1.25,1.5,2 --grid ddim_eta=0,1
    python benchmarks/sampler_selection.py RUN --grid temperature=0.7,0.85,1

Writes ``benchmarks/results/sampler-selection-<name>.json`` (``--name``, default the run
directory's name) and prints a table. Results: docs/benchmarks.md, "Choosing the sampler on a
validation half".
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, load_average, write_result  # noqa: E402

from fedgen.contract import rundir  # noqa: E402
from fedgen.contract.task import build_global_model  # noqa: E402
from fedgen.evaluation.tstr import train_synthetic_test_real, wilson_interval  # noqa: E402
from fedgen.server.evaluate import evaluation_draws  # noqa: E402


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    """``["guidance_scale=1,2", "ddim_eta=0,1"]`` -> ``{"guidance_scale": [1.0, 2.0], ...}``."""
    grid: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        try:
            grid[name.strip()] = [float(v) for v in values.split(",")] if sep else []
        except ValueError:
            grid[name.strip()] = []
        if not grid[name.strip()]:
            raise SystemExit(f"sampler_selection: --grid {item!r}: write KNOB=V1,V2,... with numbers")
    return grid


def sampling_family(model: nn.Module, knobs: list[str]) -> nn.Module:
    """The module whose attributes the knobs are: the model, or the family a warm start wraps."""
    module: nn.Module | None = model
    while module is not None:
        if all(hasattr(module, k) for k in knobs):
            return module
        module = getattr(module, "inner", None)
    raise SystemExit(f"sampler_selection: the run's model has no sampling knob(s) {', '.join(knobs)}; "
                     "a diffusion model has guidance_scale, ddim_eta, sample_steps; a flow has temperature")


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the best validation accuracy (the first on a tie); its test accuracy is
    never looked at."""
    return max(rows, key=lambda r: r["validation_accuracy"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory (fedgen simulate --out RUN)")
    parser.add_argument("--round", type=int, default=None, help="the checkpoint's round (default: the last)")
    parser.add_argument("--grid", action="append", required=True, help="KNOB=V1,V2,... (repeat for a grid)")
    parser.add_argument("--name", default=None, help="result file: sampler-selection-NAME.json")
    args = parser.parse_args(argv)

    grid = parse_grid(args.grid)
    if not (args.run / "scenario.yaml").is_file():
        raise SystemExit(f"sampler_selection: {args.run} is not a run directory (no scenario.yaml); "
                         "pass the --out folder of a finished fedgen simulate")
    scenario, spec = rundir.read_scenario(args.run), rundir.DataSpec.read(args.run)
    checkpoints = sorted((args.run / "checkpoints").glob("model-round-*.pt"))
    if not checkpoints:
        raise SystemExit(f"sampler_selection: {args.run}/checkpoints has no model-round-*.pt; is it a finished run?")
    rnd = args.round if args.round is not None else int(checkpoints[-1].stem.rsplit("-", 1)[1])
    model = build_global_model(scenario, spec)
    model.load_state_dict(torch.load(args.run / "checkpoints" / f"model-round-{rnd:04d}.pt", weights_only=True))
    model.eval()
    family = sampling_family(model, list(grid))
    if model.num_classes is None:
        raise SystemExit(f"sampler_selection: {args.run}: the model is unconditional; TSTR (and this choice) "
                         "needs a class-conditional model")

    ref_x, ref_y = rundir.read_reference(args.run)
    rx, ry = torch.from_numpy(ref_x).float(), torch.from_numpy(ref_y).long()
    rows: list[dict[str, Any]] = []
    load_start = load_average()
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        for knob, value in setting.items():
            current = getattr(family, knob)
            setattr(family, knob, type(current)(value))
        samples, labels = evaluation_draws(model, scenario.evaluation.num_samples, round_seed=scenario.seed + rnd)
        result = train_synthetic_test_real(samples, labels.cpu(), rx, ry, num_classes=model.num_classes,
                                           seed=scenario.seed)
        row = {**setting, "validation_accuracy": result.validation_accuracy, "test_accuracy": result.tstr_accuracy}
        rows.append(row)
        print(" ".join(f"{key} {value:.4g}" for key, value in row.items()), flush=True)
    chosen = choose(rows)
    low, high = wilson_interval(round(chosen["test_accuracy"] * result.n_real_test), result.n_real_test)
    payload = {"run": str(args.run), "scenario": scenario.name, "round": rnd, "grid": grid,
               "validation_records": result.n_real_train, "test_records": result.n_real_test, "rows": rows,
               "chosen": chosen, "chosen_test_ci95": [low, high],
               "meaning": "chosen by validation accuracy (the real-train half TSTR never tests on); its "
                          "test_accuracy is the run's TSTR with that setting; the other rows' test accuracies "
                          "are for the record, not used to choose",
               "load_start": load_start, "load_end": load_average(), "environment": environment()}
    path = write_result(f"sampler-selection-{args.name or args.run.name}", payload)
    print(f"chosen: {', '.join(f'{k}={chosen[k]:g}' for k in grid)}: validation {chosen['validation_accuracy']:.3f}, "
          f"test (the TSTR to report) {chosen['test_accuracy']:.3f} [{low:.3f}, {high:.3f}] -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
