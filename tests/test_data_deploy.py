"""Deployment pieces without Flower: CSV and image-folder readers, the deployment run
directory, key material, the ledger across runs and the site's own epsilon cap."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import yaml

from .conftest import REPO
from PIL import Image

from fedgen.client.data import load_data, read_csv, read_image_folder
from fedgen.client.errors import DataError
from fedgen.contract.data_formats import CsvOptions, ImageOptions
from fedgen.privacy.ledger import SiteLedger


# -- CSV ----------------------------------------------------------------------------

def _csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


def test_csv_with_label_and_fixed_scaling(tmp_path):
    f = _csv(tmp_path / "site.csv", ["a", "b", "label"], [[0, 16, 1], [8, 4, 0], [16, 0, 2]])
    data = load_data("csv", f, {"label-column": "label", "feature-min": 0, "feature-max": 16})
    assert data.shape == (2,) and data.num_classes == 3
    np.testing.assert_allclose(data.x.numpy(), [[0, 1], [0.5, 0.25], [1, 0]])
    assert data.y.tolist() == [1, 0, 2]
    # per-column statistics as --node-config passes them (a comma-separated string)
    data = read_csv(f, CsvOptions(label_column=2, feature_min="0,0", feature_max="16,32"))
    np.testing.assert_allclose(data.x.numpy()[:, 1], [0.5, 0.125, 0.0])


def test_csv_stats_file_and_clip(tmp_path):
    f = _csv(tmp_path / "site.csv", ["a", "b"], [[-1, 5], [3, 20]])
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"min": [0, 0], "max": [2, 10]}))
    with pytest.raises(DataError, match=r"site\.csv: x values span"):
        read_csv(f, CsvOptions(feature_stats=str(stats)))  # out of [0, 1] after scaling: rejected, not rescaled from data
    data = read_csv(f, CsvOptions(feature_stats=str(stats), feature_clip=True))
    assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0 and data.y is None


@pytest.mark.parametrize("content, options, message", [
    ("a,b\n0.1,x\n", {}, r"line 2, column 'b': 'x' is not a number"),
    ("a,b\n0.1\n", {}, "line 2 has 1 cells"),
    ("a,b\n0.1,0.2\n", {"label_column": "y"}, "label column 'y' not in the header"),
    ("a,b\n0.1,0.2\n", {"feature_min": 0}, "give both feature-min and feature-max"),
    ("a,b\n0.1,0.2\n", {"feature_min": "0,0,0", "feature_max": 1}, "feature-min has 3 values"),
    ("a,b\n", {}, "at least one data row"),
    ("a,b\n0.5,nan\n", {}, "NaN/Inf"),
    ("a,b\n5,0.2\n", {}, "expected \\[0, 1\\]"),
])
def test_csv_errors_name_the_file(tmp_path, content, options, message):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_csv(f, CsvOptions(**options))
    assert "bad.csv" in str(err.value)


def test_unknown_reader_option_is_refused(tmp_path):
    f = _csv(tmp_path / "s.csv", ["a"], [[0.5]])
    with pytest.raises(DataError, match="colour not accepted by data format 'csv'; accepted: label_column"):
        load_data("csv", f, {"colour": "red"})


# -- image folders --------------------------------------------------------------------

def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("0", "1", "2"):
        for k in range(2):
            _png(tmp_path / "imgs" / label / f"{k}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    data = load_data("images", tmp_path / "imgs")
    assert len(data) == 6 and data.shape == (1, 8, 8) and data.num_classes == 3
    assert sorted(data.y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) <= 1.0


def test_image_folder_rgb_unlabelled_and_named_classes(tmp_path):
    for k in range(3):
        _png(tmp_path / "flat" / f"{k}.jpg", np.full((4, 6, 3), 40 * k, dtype=np.uint8))
    data = read_image_folder(tmp_path / "flat")
    assert data.shape == (3, 4, 6) and data.y is None
    for name in ("dog", "cat"):
        _png(tmp_path / "named" / name / "a.png", np.zeros((4, 4), dtype=np.uint8))
    assert read_image_folder(tmp_path / "named", ImageOptions(image_classes="dog,cat")).y.tolist() == [1, 0]  # cat, dog folders
    with pytest.raises(DataError, match="not in the configured classes"):
        read_image_folder(tmp_path / "named", ImageOptions(image_classes=["dog"]))


def test_image_folder_errors_name_the_file(tmp_path):
    _png(tmp_path / "mixed" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    _png(tmp_path / "mixed" / "b.png", np.zeros((9, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"b\.png: image is 8x9 .* all images must share a size"):
        read_image_folder(tmp_path / "mixed")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"x\.png: cannot read image"):
        read_image_folder(tmp_path / "broken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg images"):
        read_image_folder(tmp_path / "empty")


# -- deployment run directory -------------------------------------------------------------

def _deployment_scenario(tmp_path, reference=None):
    from fedgen.contract.scenario import load_scenario

    raw = {"name": "dep", "federation": {"num_sites": 2, "rounds": 1},
           "model": {"family": "vae", "hidden": 32, "latent_dim": 4},
           "deployment": {"data_shape": [1, 8, 8], "num_classes": 10, "reference": reference}}
    path = tmp_path / "dep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_scenario(path)


def test_deployment_run_dir_has_no_data(tmp_path, digits):
    from fedgen.contract import rundir
    from fedgen.simulations.prepare import write_deployment_run_dir

    run = write_deployment_run_dir(_deployment_scenario(tmp_path), tmp_path / "run")
    spec = rundir.DataSpec.read(run)
    assert spec.shape == (1, 8, 8) and spec.num_classes == 10 and spec.num_sites == 2 and spec.path is None
    assert not (run / rundir.PARTITIONS).exists() and rundir.read_reference(run) is None
    assert rundir.read_scenario(run).deployment.data_shape == [1, 8, 8]

    ref = tmp_path / "public.npz"
    np.savez(ref, x=digits.x[:50].numpy(), y=digits.y[:50].numpy())
    run2 = write_deployment_run_dir(_deployment_scenario(tmp_path, str(ref)), tmp_path / "run2")
    x, y = rundir.read_reference(run2)
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,)


def test_deployment_reference_shape_mismatch(tmp_path):
    from fedgen.simulations.errors import ScenarioError
    from fedgen.simulations.prepare import write_deployment_run_dir

    ref = tmp_path / "public.npz"
    np.savez(ref, x=np.zeros((5, 1, 4, 4), dtype=np.float32))
    with pytest.raises(ScenarioError, match="shape"):
        write_deployment_run_dir(_deployment_scenario(tmp_path, str(ref)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_server_evaluator_without_reference_only_draws_samples(tmp_path):
    import torch

    from fedgen.server.evaluate import GlobalEvaluator
    from fedgen.shared_models import build_model

    model = build_model("vae", data_shape=(1, 8, 8), num_classes=None, hidden=16, latent_dim=2)
    torch.manual_seed(0)
    out = GlobalEvaluator(None, seed=0)(model, num_samples=10, round_seed=1, grid_path=tmp_path / "g.png")
    assert out == {} and (tmp_path / "g.png").exists()


def test_cli_prepare_and_certs(tmp_path, capsys):
    import argparse

    from fedgen.simulations.deploy_cli import add_deploy_parsers

    parser = argparse.ArgumentParser()
    add_deploy_parsers(parser.add_subparsers())
    _deployment_scenario(tmp_path)
    args = parser.parse_args(["prepare", str(tmp_path / "dep.yaml"), "--out", str(tmp_path / "run")])
    assert args.func(args) == 0 and (tmp_path / "run" / "inputs" / "site_data.json").exists()
    args = parser.parse_args(["certs", str(tmp_path / "keys"), "--sites", "2", "--superlink-host", "10.0.0.5",
                              "--superlink-host", "link.example.org"])
    assert args.func(args) == 0 and (tmp_path / "keys" / "sites" / "1" / "auth.key").exists()
    old = (tmp_path / "keys" / "sites" / "1" / "auth.pub").read_text()
    args = parser.parse_args(["certs", str(tmp_path / "keys"), "--rotate-site", "1"])
    assert args.func(args) == 0 and (tmp_path / "keys" / "sites" / "1" / "auth.pub").read_text() != old


# -- key material -------------------------------------------------------------------------

def test_certs_layout_sans_modes_and_flower_key_formats(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedgen.simulations.certs import write_federation_keys

    keys = write_federation_keys(tmp_path, sites=2, hosts=["127.0.0.1", "superlink.example.org"])
    for secret in (keys.ca_key, keys.server_key, *keys.site_private_keys.values()):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    cert = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    # loopback is always named: the operator's flwr and the SuperExec use the Control/Runtime API there
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    cert.verify_directly_issued_by(ca)
    # what flower-supernode / flwr supernode register load (flwr 1.42 sources)
    private = load_ssh_private_key(keys.site_private_keys["0"].read_bytes(), None)
    public = load_ssh_public_key(keys.site_public_keys["0"].read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1" and private.public_key() == public
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    assert uses_nist_ec_curve(public)
    with pytest.raises(FileExistsError):
        write_federation_keys(tmp_path, sites=1)


@pytest.mark.parametrize("site", ["../../escaped", "/abs", ".."])
def test_finding9b_rotate_site_cannot_write_outside_out_dir(tmp_path, site):
    import subprocess
    import sys

    from fedgen.simulations.certs import write_federation_keys

    out = tmp_path / "deep" / "keys"
    write_federation_keys(out, sites=1)
    before = sorted(p for p in tmp_path.rglob("*"))
    res = subprocess.run([sys.executable, "-m", "fedgen.simulations.cli", "certs", str(out), "--rotate-site", site],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    message = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(message) == 1 and "site name" in message[0] and "not allowed" in message[0], message
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, anywhere


def test_finding9b_site_names_are_checked_by_one_reusable_function(tmp_path):
    from fedgen.privacy.errors import PrivacyError
    from fedgen.privacy.site_id import check_site_id, is_valid_site_id
    from fedgen.simulations.certs import write_federation_keys

    assert [is_valid_site_id(s) for s in ("0", "hospital-a", "site_1.eu", "A" * 64)] == [True] * 4
    assert [is_valid_site_id(s) for s in ("..", "../x", "a/b", "-a", "a..b", "A" * 65, "a b")] == [False] * 7
    assert check_site_id("hospital-a") == "hospital-a"
    with pytest.raises(PrivacyError, match="'../x' is not allowed"):
        check_site_id("../x")
    with pytest.raises(ValueError, match="not allowed"):  # --sites names too, before any file is made
        write_federation_keys(tmp_path / "keys", sites=["ok", "../bad"])
    assert not (tmp_path / "keys").exists()


# -- the ledger across runs, and the site's cap ----------------------------------------

def _ledger() -> SiteLedger:
    return SiteLedger(site="a", accountant="rdp", delta=1e-5, target_epsilon=10.0, max_grad_norm=1.0,
                      noise_multiplier=1.0, sample_rate=0.05)


def test_ledger_rounds_are_unique_per_run():
    ledger = _ledger()
    ledger.record_round(round=1, steps=10, noise_multiplier=1.0, sample_rate=0.05, run=111)
    with pytest.raises(ValueError, match="run 111, round 1 is already"):
        ledger.record_round(round=1, steps=10, noise_multiplier=1.0, sample_rate=0.05, run=111)
    eps_one = ledger.epsilon
    ledger.record_round(round=1, steps=10, noise_multiplier=1.0, sample_rate=0.05, run=222)  # a later run
    assert ledger.epsilon > eps_one and ledger.steps == 20
    back = SiteLedger.from_json(ledger.to_json())
    assert [h.run for h in back.history] == ["111", "222"] and back.epsilon == pytest.approx(ledger.epsilon)
    # simulation entries (no run) keep the old layout: no "run" key in privacy.json
    sim = _ledger()
    sim.record_round(round=1, steps=1, noise_multiplier=1.0, sample_rate=0.05)
    assert "run" not in sim.to_dict()["history"][0]
    with pytest.raises(ValueError, match="round 1 is already"):
        sim.record_round(round=1, steps=1, noise_multiplier=1.0, sample_rate=0.05)


def test_site_cap_and_state_dir_rules(tmp_path):
    from flwr.app import Context, RecordDict

    from fedgen.client.policy import SitePolicy
    from fedgen.client.site import ledger_run, load_ledger
    from fedgen.contract.task import PrivacyConfig

    def ctx(**node):
        return Context(run_id=42, node_id=7, node_config=node, state=RecordDict(), run_config={})

    privacy = PrivacyConfig(enabled=True, target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0)

    def capped(**node):
        return SitePolicy.from_node_config(node).apply(privacy, num_examples=1000).target_epsilon

    assert capped(**{"max-epsilon": 2.5}) == 2.5
    assert capped(**{"max-epsilon": 20.0}) == 8.0  # lower wins
    assert capped() == 8.0
    with pytest.raises(DataError, match="max-epsilon"):
        capped(**{"max-epsilon": "-1"})
    assert ledger_run(ctx(**{"state-dir": str(tmp_path)})) == "42" and ledger_run(ctx()) is None
    with pytest.raises(DataError, match="no state-dir"):
        load_ledger(ctx(**{"data-path": "x.npz"}), "a")
