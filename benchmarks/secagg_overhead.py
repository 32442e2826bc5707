"""What secure aggregation adds to a round (issue 19): round time with and without it.

    python benchmarks/secagg_overhead.py [--sites 10 100] [--dim 55376] [--rounds 3] [--no-e2e]
                                         [--result NAME]

Two measurements, both over the in-process engine's grid and nodes (real Flower Messages,
the real site mod ``client/secagg.py`` and server workflow ``server/secagg.py``):

- protocol: ``n`` sites whose "training" returns a fixed random update of ``dim``
  float32 values (default: the quickstart VAE's 55,376 parameters), so the round time is
  the messaging, the cryptography, the masking and the aggregation alone. Without secure
  aggregation the round is one train exchange plus the server's mean; with it the four
  stages. SecAgg (every site shares keys with every other) at 10 sites; at 100 sites
  also SecAgg+ (``neighbours: 16``, Bell et al.'s sparse graph), which is what makes 100
  sites affordable. Median of ``--rounds`` rounds. One process, sites one after another:
  the times are the sum of every site's work plus the server's, on one core.
- end to end (10 sites, unless ``--no-e2e``): ``fedgen simulate scenarios/quickstart.yaml``
  with ``federation.num_sites=10``, 3 rounds, in-process engine, with and without
  ``federation.secure_aggregation``: the median ``seconds`` of rounds 2-3 (no
  evaluation before the last round, whose evaluation time is subtracted), and the CPU
  seconds of each whole run (the machine is shared: CPU time is the steadier figure).

Writes benchmarks/results/<NAME>.json (default secagg_overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from _common import REPO, environment, load_average, write_result
from fedgen.client.secagg import secagg_mod
from fedgen.server.secagg import SecAggWorkflow
from fedgen.simulations.inprocess_engine import InProcessGrid, SimulatedNode, _task_identity


def _grid(n: int, dim: int) -> InProcessGrid:
    rng = np.random.default_rng(0)
    updates = rng.normal(0, 1e-2, size=(n, dim)).astype(np.float32)
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy() + updates[int(context.node_config["partition-id"])]
        return Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(w)})}), reply_to=msg)

    return InProcessGrid(SimulatedNode(10_000 + i, i, n, 5, {}, app) for i in range(n))


def _messages(grid: InProcessGrid, global_arrays: ArrayRecord) -> list[Message]:
    return [Message(content=RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1})}),
                    message_type=MessageType.TRAIN, dst_node_id=n) for n in grid.get_node_ids()]


def plain_round(grid: InProcessGrid, global_arrays: ArrayRecord) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    replies = list(grid.send_and_receive(_messages(grid, global_arrays)))
    np.mean([r.content["arrays"]["w"].numpy() for r in replies], axis=0)
    return time.perf_counter() - t, time.process_time() - c


def secagg_round(grid: InProcessGrid, global_arrays: ArrayRecord, threshold: int,
                 neighbours: int | None) -> tuple[float, float, dict[str, float]]:
    wf = SecAggWorkflow(threshold=threshold, bits=32, clip_norm=100.0, num_neighbours=neighbours)
    t, c = time.perf_counter(), time.process_time()
    rnd, _, replies = wf.collect(grid, 1, _messages(grid, global_arrays))
    t_collect = time.perf_counter()
    new = wf.unmask(grid, rnd, [r for r in replies if not r.has_error()], global_arrays)
    t_end = time.perf_counter()
    assert new is not None and rnd.sites_aggregated == len(grid.nodes), rnd.aborted
    return t_end - t, time.process_time() - c, {"stages_1_3_s": t_collect - t, "unmask_s": t_end - t_collect}


def protocol(n: int, dim: int, rounds: int, neighbours: int | None) -> dict[str, Any]:
    grid = _grid(n, dim)
    global_arrays = ArrayRecord({"w": Array(np.zeros(dim, dtype=np.float32))})
    size = n if neighbours is None else min(n, neighbours + 1)
    threshold = size // 2 + 1
    plain, sec, plain_cpu, sec_cpu, parts = [], [], [], [], []
    with _task_identity(5):
        for _ in range(rounds):
            wall, cpu = plain_round(grid, global_arrays)
            plain.append(wall)
            plain_cpu.append(cpu)
            wall, cpu, p = secagg_round(grid, global_arrays, threshold, neighbours)
            sec.append(wall)
            sec_cpu.append(cpu)
            parts.append(p)
    out = {"sites": n, "dim": dim, "neighbours": neighbours, "threshold": threshold,
           "plain_round_s": statistics.median(plain), "secagg_round_s": statistics.median(sec),
           "plain_round_cpu_s": statistics.median(plain_cpu), "secagg_round_cpu_s": statistics.median(sec_cpu),
           "secagg_stages_1_3_s": statistics.median(p["stages_1_3_s"] for p in parts),
           "secagg_unmask_s": statistics.median(p["unmask_s"] for p in parts)}
    out["overhead_s"] = out["secagg_round_s"] - out["plain_round_s"]
    out["overhead_cpu_s"] = out["secagg_round_cpu_s"] - out["plain_round_cpu_s"]
    print(json.dumps(out), flush=True)
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def end_to_end(rounds: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": "quickstart", "num_sites": 10, "rounds": rounds, "engine": "inprocess"}
    for label, extra in (("plain", []), ("secagg", ["federation.secure_aggregation.threshold=6"])):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            cpu = _children_cpu()
            sets = ["federation.num_sites=10", f"federation.rounds={rounds}", "evaluation.every=0",
                    "evaluation.num_samples=100", "simulation.device=cpu", *extra]
            subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", "simulate",
                            str(REPO / "scenarios" / "quickstart.yaml"), "--out", str(run),
                            *[a for s in sets for a in ("--set", s)]], check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            secs = [r["seconds"] - (r.get("eval_seconds") or 0.0) for r in rows[1:]]
            out[f"{label}_round_s"] = statistics.median(secs)
            out[f"{label}_final_train_loss"] = rows[-1]["train_loss"]
            out[f"{label}_run_cpu_s"] = _children_cpu() - cpu  # the whole run, start-up and evaluation too
    out["overhead_s"] = out["secagg_round_s"] - out["plain_round_s"]
    out["overhead_cpu_per_round_s"] = (out["secagg_run_cpu_s"] - out["plain_run_cpu_s"]) / rounds
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--dim", type=int, default=55376)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--result", default="secagg_overhead")
    args = ap.parse_args()
    load_before = load_average()
    results = []
    for n in args.sites:
        if n <= 20:
            results.append(protocol(n, args.dim, args.rounds, None))
        else:
            results.append(protocol(n, args.dim, args.rounds, 16))
    e2e = None if args.no_e2e else end_to_end()
    payload = {"environment": environment(), "load_average_before": load_before,
               "load_average_after": load_average(), "protocol": results, "end_to_end": e2e}
    print(write_result(args.result, payload))


if __name__ == "__main__":
    main()
