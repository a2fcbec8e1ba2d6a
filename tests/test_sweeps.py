"""The claim sweeps: each varies only what its claim varies, and sweeps=all feeds the report."""
import json

import pytest
import yaml

from alexlab.claims import CLAIMS, get_path
from alexlab.report import build_report
from conftest import CONF, ROOT, compose_cfg, requires_fashion, run_cli
from omegaconf import OmegaConf

SWEEP_IDS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))


def test_one_sweep_per_claim_plus_all():
    assert set(SWEEP_IDS) == set(CLAIMS) | {"all"}


@pytest.mark.parametrize("claim_id", sorted(CLAIMS))
def test_each_sweep_varies_only_its_claims_factor(claim_id):
    claim = CLAIMS[claim_id]
    sweep = yaml.safe_load((ROOT / "sweeps" / f"{claim_id}.yaml").read_text())
    params = sweep["hydra"]["sweeper"]["params"]
    assert set(params) - set(claim.tune) == {"ablation", "seed"}
    assert params["seed"] == "0,1,2"
    ablations = params["ablation"].split(",")
    # a claim whose ablation only changes the test reads it from the paper runs (claims.recorded_as)
    assert ablations == ["paper", *({} if claim.recorded_as else claim.ablations)]
    base = OmegaConf.to_container(compose_cfg("scale=tiny", f"sweeps={claim_id}", "ablation=paper"), resolve=True)
    assert get_path(base, claim.factor) == claim.paper_value
    for name, value in claim.ablations.items():
        ablated = OmegaConf.to_container(compose_cfg("scale=tiny", f"sweeps={claim_id}", f"ablation={name}"), resolve=True)
        assert get_path(ablated, claim.factor) == value
        # Nothing else differs between the paper run and the ablated run.
        parent, key = claim.factor.rsplit(".", 1)
        get_path(ablated, parent)[key] = claim.paper_value
        assert ablated == base


def test_all_sweep_covers_every_ablation():
    sweep = yaml.safe_load((ROOT / "sweeps" / "all.yaml").read_text())
    listed = set(sweep["hydra"]["sweeper"]["params"]["ablation"].split(","))
    trained = {a for c in CLAIMS.values() if not c.recorded_as for a in c.ablations}
    assert listed == {"paper"} | trained
    # the other ablations are measured by the paper runs themselves (claims.recorded_as: single_crop)
    assert {p.stem for p in (CONF / "ablation").glob("*.yaml")} - listed == {"single_crop"}


@requires_fashion
@pytest.mark.slow
def test_all_claims_at_tiny_scale_then_the_report(tmp_path):
    proc = run_cli("-m", "sweeps=all", "scale=tiny", "seed=0,1", "trainer.epochs=1", "logger=none",
                   "hydra.sweep.dir=sweep", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs as one only with -m" not in proc.stdout + proc.stderr  # it is a multirun
    results = list((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 11 * 2  # the paper runs and 10 ablations (single_crop: the paper runs' own test)
    assert all(json.loads(p.read_text())["status"] == "completed" for p in results)

    report = build_report([tmp_path / "sweep"], tmp_path / "report")
    claims_seen = {row["claim"] for row in report["rows"]}
    assert claims_seen == set(CLAIMS)
    for row in report["rows"]:
        assert row["verdict"] in ("reproduced", "contradicted", "inconclusive"), row
        assert row["n"] == 2 or row["verdict"] == "inconclusive", row
    # ten_crop from the paper runs' own single-crop tests: one row, a pair per seed; not a row per ablation
    assert [row["n"] for row in report["rows"] if row["claim"] == "ten_crop"] == [2]
    text = (tmp_path / "report" / "report.md").read_text()
    for claim_id in CLAIMS:
        assert claim_id in text
    assert (tmp_path / "report" / "deltas.png").stat().st_size > 1000
