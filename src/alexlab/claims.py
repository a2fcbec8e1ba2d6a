"""The paper's claims as data: what each one changes, what it is judged on, and the paper's number.

Every effect is stated as *ablated minus paper* for error metrics (points), and as *ablated / paper*
for the step-count metrics (`steps_to_*`, ratios), so a positive difference in error means the
paper's choice helped. `factor` is the config path the claim's ablations change; `ablations` maps
each ablation (a file in conf/ablation/) to its value there. An effect of None means the paper gives
a direction but no number: the ablated run is worse (difference > 0).
Metric names are defined in alexlab.report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Claim:
    id: str
    section: str
    statement: str
    factor: str                      # config path, e.g. "model.lrn"
    paper_value: Any                 # the paper's choice: the baseline
    ablations: dict                  # ablation name -> value of `factor` in that ablation
    effects: dict                    # metric -> paper's effect (ablated - paper, or ratio); None = direction only
    tune: tuple = ()                 # config paths tuned per factor value (best value of each is used)
    # Where the ablation only changes how the trained net is tested, the paper's runs measure it too:
    # history key of the ablated test -> the key the paper's runs record it under. The report reads the
    # ablated side from them (alexlab.report.tested_twins), so the claim costs no second training.
    recorded_as: dict = field(default_factory=dict)
    paper_says: str = ""
    note: str = ""


def is_ratio(metric: str) -> bool:
    return metric.startswith("steps_to_")


def paper_direction(metric: str, effect: float | None) -> int:
    """+1 when the paper says the ablated run is higher (error, gap, or a ratio above 1), else -1."""
    if effect is None:
        return +1
    return +1 if (effect > 1 if is_ratio(metric) else effect > 0) else -1


CLAIMS: dict[str, Claim] = {c.id: c for c in [
    Claim("relu", "3.1, fig. 1", "ReLU reaches 25% training error faster than tanh (iterations)",
          factor="model.activation", paper_value="relu", ablations={"tanh": "tanh"},
          effects={"steps_to_25_train_err": 6.0}, tune=("optim.lr",),
          paper_says="tanh needs 6x the iterations of ReLU to reach 25% training error",
          note="learning rate chosen per activation from the sweep's grid (the best of each)"),
    Claim("lrn", "3.3", "local response normalisation lowers error",
          factor="model.lrn", paper_value=True, ablations={"no_lrn": False},
          effects={"val_top1_err": 1.4, "val_top5_err": 1.2}, paper_says="+1.4 / +1.2 points without LRN"),
    Claim("overlap_pool", "3.4", "overlapping pooling (3/2) lowers error versus 2/2, and overfits slightly less",
          factor="model.overlap_pool", paper_value=True, ablations={"no_overlap_pool": False},
          effects={"val_top1_err": 0.4, "val_top5_err": 0.3, "overfit_gap": None},
          paper_says="+0.4 / +0.3 points with 2/2 pooling, which overfits slightly more (no number)"),
    Claim("towers", "3.2", "the two-tower net beats the one-tower net with half the kernels",
          factor="model.towers", paper_value=2, ablations={"one_tower": 1},
          effects={"val_top1_err": 1.7, "val_top5_err": 1.2}, paper_says="+1.7 / +1.2 points with one tower"),
    Claim("pca_lighting", "4.1", "PCA lighting lowers top-1 error",
          factor="data.pca_lighting", paper_value=True, ablations={"no_pca_lighting": False},
          effects={"val_top1_err": 1.0}, paper_says="over +1 point top-1 without it"),
    Claim("crop_flip", "4.1", "without crops and mirrors the net overfits substantially",
          factor="data.crop_flip", paper_value=True, ablations={"no_crop_flip": False},
          # the centre patch: a net trained on centre crops alone never saw the ten-patch test's corners
          # and mirrors, a mismatch the ten-patch error would add to what the claim is about
          effects={"overfit_gap": None, "val_centre_top1_err": None},
          paper_says="substantial overfitting without them (no number)"),
    Claim("dropout", "4.2", "without dropout the net overfits; dropout doubles the iterations to converge",
          factor="model.dropout", paper_value=0.5, ablations={"no_dropout": 0.0},
          effects={"overfit_gap": None, "steps_to_converge": 0.5},
          paper_says="substantial overfitting without dropout; about half the iterations to converge"),
    # conv2-conv4, between the first conv layer and the last. Not conv5: without it conv4's 384 maps would
    # reach fc6 (50% more inputs, +18M parameters in the paper's net: a wider classifier, not only a
    # shallower net), and with conv4 narrowed to conv5's 256 to keep fc6 as it is, the net is the one
    # without conv4.
    Claim("depth", "7", "removing any middle conv layer costs about 2 points of top-1",
          factor="model.remove", paper_value=[],
          ablations={"no_conv2": ["conv2"], "no_conv3": ["conv3"], "no_conv4": ["conv4"]},
          effects={"val_top1_err": 2.0}, paper_says="about +2 points top-1 per removed layer"),
    Claim("ten_crop", "6", "averaging ten test patches lowers error",
          factor="eval.ten_crop", paper_value=True, ablations={"single_crop": False},
          effects={"val_top1_err": 1.5, "val_top5_err": 1.3},
          paper_says="+1.5 / +1.3 points with one patch (39.0/18.3 vs 37.5/17.0)",
          # the centre patch is one of the ten: a ten-patch test records it (alexlab.train.evaluate)
          recorded_as={"val_loss": "val_centre_loss", "val_top1_err": "val_centre_top1_err",
                       "val_top5_err": "val_centre_top5_err"}),
]}


def get_path(config: dict, path: str) -> Any:
    node = config
    for key in path.split("."):
        node = node[key]
    return node
