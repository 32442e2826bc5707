"""A toy ClientApp the worker pool's tests name by reference (``tests.pool_apps:app``):
worker processes import it, so it lives at module level, not in a test function.

Each call counts itself in ``context.state``; the message's ``config`` record says at which
partition to raise (``raise-at``), to kill the worker process (``exit-at``, ``os._exit(3)``)
or to sleep (``sleep-at``, ``sleep-s``)."""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records.get("config", ConfigRecord())
    partition = int(context.node_config["partition-id"])
    calls = int(context.state.config_records.get("n", ConfigRecord({"calls": 0}))["calls"]) + 1
    context.state["n"] = ConfigRecord({"calls": calls})
    if partition == config.get("raise-at", -1):
        raise RuntimeError("boom at the site")
    if partition == config.get("exit-at", -1):
        os._exit(3)
    if partition == config.get("sleep-at", -1):
        time.sleep(float(config.get("sleep-s", 0.0)))
    metrics = MetricRecord({"calls": calls, "partition": partition, "of": int(context.node_config["num-partitions"]),
                            "pid": os.getpid(), "threads": torch.get_num_threads(),
                            "cuda-device": torch.cuda.current_device() if torch.cuda.is_available() else -1})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
