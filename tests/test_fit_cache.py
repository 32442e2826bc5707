"""The server's generator-fit cache under a release warm start (server/fit_cache.py): a hit
gives exactly the pretraining of a miss, a changed input misses, a bad entry is ignored
with one warning line, and only seeded-noise runs use it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from fedgen.server.fit_cache import GeneratorFitCache, fit_key
from fedgen.shared_models import build_model
from fedgen.shared_models.warm_start import ReleaseWarmStart, with_release_warm_start
from fedgen.simulations.cli import main as fedgen

from .conftest import REPO


def _wrapped(digits, *, seed: int = 0, generator_steps: int = 10) -> ReleaseWarmStart:
    """A small vae under a release warm start, its release set from the digits (no noise)."""
    torch.manual_seed(0)
    inner = build_model("vae", data_shape=(1, 8, 8), num_classes=10, hidden=32, latent_dim=4)
    model = with_release_warm_start(inner, release_epsilon=2.0, num_features=200, generator_steps=generator_steps,
                                    samples=200, steps=10, batch_size=64, seed=seed)
    x, y = digits.x[:500].reshape(-1, 1, 8, 8), digits.y[:500]
    model.set_release(model.statistic_sum(x, y) / len(x))
    return model


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_hit_gives_exactly_the_pretraining_of_a_miss(tmp_path, digits):
    uncached = _wrapped(digits)
    info_plain = uncached.server_update(1e-6)

    miss, cache = _wrapped(digits), GeneratorFitCache(tmp_path)
    miss.fit_cache = cache
    info_miss = miss.server_update(1e-6)
    assert cache.hits == 0 and len(list(tmp_path.glob("*.pt"))) == 1
    assert _states_equal(miss, uncached)  # caching changes nothing on a miss

    hit, cache2 = _wrapped(digits), GeneratorFitCache(tmp_path)
    hit.fit_cache = cache2
    info_hit = hit.server_update(1e-6)
    assert cache2.hits == 1
    assert _states_equal(hit.head.generator, miss.head.generator)
    assert _states_equal(hit.inner, miss.inner)  # the family's pretraining, bit for bit
    timeless = [{k: v for k, v in i.items() if not k.endswith("_seconds")} for i in (info_hit, info_miss, info_plain)]
    assert timeless[0] == timeless[1] == timeless[2]  # the fit's record too (steps, final mmd), and the pretrain loss
    assert isinstance(info_hit["server_fit_steps"], int)


def test_what_determines_the_fit_changes_the_key(digits):
    base = _wrapped(digits)
    key = fit_key(base.head, 1e-6, 0)
    # ... and nothing of the family: a sweep's families share one fit
    torch.manual_seed(0)
    diffusion = with_release_warm_start(build_model("diffusion", data_shape=(1, 8, 8), num_classes=10, hidden=8),
                                        release_epsilon=2.0, num_features=200, generator_steps=10, samples=200,
                                        steps=10, batch_size=64, seed=0)
    diffusion.set_release(base.head.embedding.clone())
    assert fit_key(diffusion.head, 1e-6, 0) == key
    assert fit_key(_wrapped(digits).head, 1e-6, 0) == key  # deterministic
    assert fit_key(base.head, 2e-6, 0) != key  # the noise level (where the fit stops)
    assert fit_key(base.head, 1e-6, 1) != key  # the fit's seed
    assert fit_key(_wrapped(digits, generator_steps=11).head, 1e-6, 0) != key  # the generator config
    other = _wrapped(digits)
    other.head.embedding[0, 0] += 1e-7  # one release coordinate
    assert fit_key(other.head, 1e-6, 0) != key


@pytest.mark.parametrize("corrupt", ["garbage", "wrong key", "wrong shape", "code"])
def test_a_bad_entry_is_ignored_with_one_warning(tmp_path, digits, caplog, corrupt):
    reference = _wrapped(digits)
    reference.server_update(1e-6)

    model, cache = _wrapped(digits), GeneratorFitCache(tmp_path)
    path = cache.path(fit_key(model.head, 1e-6, 0))
    tmp_path.mkdir(exist_ok=True)
    if corrupt == "garbage":
        path.write_bytes(b"not a torch file")
    elif corrupt == "wrong key":
        torch.save({"key": "0" * 64, "state": model.head.generator.state_dict(), "info": {}}, path)
    elif corrupt == "wrong shape":
        state = {k: torch.zeros(3) for k in model.head.generator.state_dict()}
        torch.save({"key": path.stem, "state": state, "info": {}}, path)
    else:  # an object that would run code when unpickled: weights_only refuses it
        torch.save({"key": path.stem, "state": {}, "info": {}, "x": Path("/")}, path)
    model.fit_cache = cache
    with caplog.at_level(logging.WARNING, logger="fedgen.server.fit_cache"):
        model.server_update(1e-6)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ignoring the cached generator fit" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert cache.hits == 0
    assert _states_equal(model, reference)  # fitted afresh, as without a cache
    # ... and the bad entry was replaced by a good one
    again, cache3 = _wrapped(digits), GeneratorFitCache(tmp_path)
    again.fit_cache = cache3
    again.server_update(1e-6)
    assert cache3.hits == 1 and _states_equal(again, reference)


def _release_scenario(seeded: bool) -> dict:
    base = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    base["federation"]["rounds"] = 1  # the release round: the fit and the pretraining
    base["evaluation"] = {"every": 0, "num_samples": 100}
    base["privacy"]["seeded_noise"] = seeded
    base["warm_start"] = {"release": {"epsilon_fraction": 0.3, "generator_steps": 40, "samples": 300}, "steps": 20}
    return base


@pytest.mark.slow  # three small simulations, ~25 s
def test_seeded_runs_share_the_fit_and_os_noise_runs_store_nothing(tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("FEDGEN_CACHE", str(cache_root))
    scenario = tmp_path / "s.yaml"
    runs = []
    for name, seeded in (("first", True), ("second", True)):
        scenario.write_text(yaml.safe_dump(_release_scenario(seeded)))
        out = tmp_path / name
        assert fedgen(["simulate", str(scenario), "--out", str(out)]) == 0
        runs.append(out)
    fits = list((cache_root / "generator-fits").glob("*.pt"))
    assert len(fits) == 1
    first, second = (json.loads((r / "warm_start.json").read_text()) for r in runs)
    assert first["loss"] == second["loss"]  # the same pretraining, the second from the cached fit
    a, b = (torch.load(r / "checkpoints" / "model-round-0001.pt", weights_only=True) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the model round 1 ended with
    rows = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for r in runs]
    for key in ("server_fit_steps", "server_fit_mmd", "release_noise_energy"):
        assert rows[0][key] == rows[1][key], key

    fits[0].unlink()
    scenario.write_text(yaml.safe_dump(_release_scenario(False)))
    assert fedgen(["simulate", str(scenario), "--out", str(tmp_path / "fresh")]) == 0
    assert list((cache_root / "generator-fits").glob("*.pt")) == []  # fresh noise: nothing to share
