"""report.html renders in a real headless browser: every embedded image decodes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from fedgen.evaluation.plots import save_sample_grid
from fedgen.evaluation.report import write_comparison, write_run_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

_PROBE = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
          "document.body.setAttribute('data-images',imgs.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+imgs.length);});"
          "</script></body>")


def _fake_run(path, rounds=3):
    (path / "samples").mkdir(parents=True)
    rows = [{"round": r, "clients_sampled": 5, "clients_ok": 5, "clients_failed": 0, "clients_refused": 0,
             "train_loss": 40.0 - r, "epsilon": 2.0 * r, "seconds": 1.0, "fid_domain": 300.0 / r, "precision": 0.2 * r,
             "recall": 0.1 * r, "coverage": 0.1 * r, "class_histogram": [50] * 10} for r in range(1, rounds + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"rounds_completed": rounds, "stopped_reason": "completed",
                                                   "epsilon": 6.0, "delta": 1e-5, "metrics": {"fid_domain": 100.0}}))
    (path / "scenario.yaml").write_text("name: fake\n")
    save_sample_grid(np.random.default_rng(0).random((20, 1, 8, 8)), path / "samples" / f"round-{rounds:04d}.png")
    return path


def _render(html_path):
    probe = html_path.with_name("probe.html")
    probe.write_text(html_path.read_text().replace("</body>", _PROBE))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={html_path.parent / 'chrome-profile'}", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    match = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert match, "the page did not finish loading"
    return int(match.group(1)), int(match.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium (apt-get install chromium)")
def test_run_report_and_comparison_render_without_broken_images(tmp_path):
    run = _fake_run(tmp_path / "run-a")
    ok, total = _render(write_run_report(run))
    assert total >= 3 and ok == total  # curves, sample grid, class histogram
    other = _fake_run(tmp_path / "run-b", rounds=4)
    ok, total = _render(write_comparison([run, other], tmp_path / "cmp"))
    assert total >= 4 and ok == total
    assert "| epsilon | 6 | 6 |" in (tmp_path / "cmp" / "comparison.md").read_text()
