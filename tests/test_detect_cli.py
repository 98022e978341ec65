"""A YOLO detector through the CLI on the generated ``fashion-detect`` set at 64 px: train -> prune -> finetune (KD)
-> export (ONNX verified) -> report, each stage's run directory holding test-split mAP; the pruned detector keeps its
output shapes; the test-split mAP of a detector that returns the true boxes is 1. No network: the set is generated
from Debian's Fashion-MNIST (skipped where it is absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")
pytest.importorskip("ultralytics.nn.tasks")

from prunekit import runs  # noqa: E402
from prunekit.cli.main import main  # noqa: E402
from prunekit.errors import DataNotFoundError  # noqa: E402

SIZE = 64
DATA = ["--dataset", "fashion-detect", "--image-size", str(SIZE), "--batch-size", "16"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """The whole chain once: base (1 epoch on 16 images), pruned (variance, ratio 0.3), ft (1 epoch, KD)."""
    from prunekit.data import get_dataset

    try:
        get_dataset("fashion-detect", "test", image_size=SIZE)
    except DataNotFoundError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("detect_cli")
    d = {k: root / k for k in ("base", "pruned", "ft", "report")}
    assert main(["train", "--model", "ultralytics:yolov8n.yaml", *DATA, "--epochs", "1", "--train-samples", "16",
                 "--out", str(d["base"])]) == 0
    assert main(["prune", "--from", str(d["base"]), "--criterion", "variance", "--ratio", "0.3", "--calib-batches",
                 "2", "--batch-size", "16", "--out", str(d["pruned"])]) == 0
    assert main(["finetune", "--from", str(d["pruned"]), "--epochs", "1", "--kd", "--batch-size", "16",
                 "--out", str(d["ft"])]) == 0
    return d


def _metrics(d: Path) -> dict:
    return json.loads((d / runs.METRICS).read_text())


def test_each_stage_reports_test_map(chain) -> None:
    expected = {"base": "train", "pruned": "prune", "ft": "finetune"}
    for name, stage in expected.items():
        m = _metrics(chain[name])
        assert m["stage"] == stage and m["task"] == "detect" and "top1" not in m
        assert m["test_samples"] == 200  # fashion-detect's test split, not val (val only picks epochs)
        assert 0.0 <= m["map50_95"] <= m["map50"] <= 1.0
        assert runs.RUN_FILES <= {p.name for p in chain[name].iterdir()}
    assert "val_map50_95" in _metrics(chain["base"]) and _metrics(chain["ft"])["teacher"] == str(chain["base"])
    assert [h["phase"] for h in runs.read_history(chain["ft"])] == ["finetune"]
    assert _metrics(chain["pruned"])["macs"] < _metrics(chain["base"])["macs"]
    assert _metrics(chain["pruned"])["bn_recalibration_batches"] == 2
    assert _metrics(chain["ft"])["macs"] == _metrics(chain["pruned"])["macs"]  # the trainer kept the pruned widths


def _convs(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_pruned_detector_keeps_output_shapes(chain) -> None:
    base, ft = runs.load_model(chain["base"]), runs.load_model(chain["ft"])  # rebuilt from safetensors + model.json
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        (y0, raw0), (y1, raw1) = base(x), ft(x)
    assert y1.shape == y0.shape == (2, 4 + 10, 84)  # box + 10 class channels at 8x8 + 4x4 + 2x2 anchors
    assert raw1["boxes"].shape == raw0["boxes"].shape and raw1["scores"].shape == raw0["scores"].shape
    c0, c1 = _convs(base), _convs(ft)
    thinner = [n for n in c0 if c1[n] < c0[n]]
    assert len(thinner) > 40 and "model.2.cv1a.conv" in thinner  # C2f's split conv is pruned too


def test_export_verifies_onnx(chain, capsys) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["export", "--from", str(chain["ft"]), "--format", "onnx", "--verify", "--atol", "1e-3"]) == 0
    manifest = json.loads((chain["ft"] / "export" / "export.json").read_text())
    v = manifest["formats"]["onnx"]["verify"]
    assert v["ok"] and v["batch_size"] == 3 and "verified" in capsys.readouterr().out


def test_report_shows_map(chain) -> None:
    assert main(["report", str(chain["base"]), str(chain["pruned"]), str(chain["ft"]), "--out",
                 str(chain["report"])]) == 0
    html = (chain["report"] / "report.html").read_text()
    assert "mAP50-95 %" in html and "mAP drop" in html and "top-1 %" not in html
    md = (chain["report"] / "report.md").read_text()
    ft_row = next(line for line in md.splitlines() if line.startswith("| ft "))
    assert f"{100 * _metrics(chain['ft'])['map50_95']:.2f}" in ft_row


class _Oracle(nn.Module):
    """Returns, batch after batch, the true boxes of the images in loader order as YOLO's decoded predictions
    ``(B, 4 + nc, anchors)``: xywh in pixels, then one-hot class scores."""

    def __init__(self, targets: list[dict], nc: int, anchors: int = 16):
        super().__init__()
        self.targets, self.nc, self.anchors, self.seen = targets, nc, anchors, 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        y = torch.zeros(len(x), 4 + self.nc, self.anchors)
        for i in range(len(x)):
            t = self.targets[self.seen + i]
            b = t["boxes"]
            y[i, :4, :len(b)] = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                                             b[:, 3] - b[:, 1]])
            y[i, 4 + t["labels"], torch.arange(len(b))] = 0.9
        self.seen += len(x)
        return y, {}


def test_test_map_of_true_boxes_is_one() -> None:
    """The test-split mAP path (targets, NMS, box layout) scores a detector returning the true boxes 1.0, and one
    returning them one pixel off at IoU >= 0.5 but not at 0.95."""
    from prunekit.data import get_dataset
    from prunekit.pipeline.detect import split_dataset, test_detection

    data = {"dataset": "fashion-detect", "data_dir": None, "image_size": SIZE}
    try:
        get_dataset("fashion-detect", "test", image_size=SIZE)
    except DataNotFoundError as e:
        pytest.skip(str(e))
    ds = split_dataset(data, "test", limit=24)
    truth = [ds[i][1] for i in range(len(ds))]
    m = test_detection(_Oracle(truth, ds.num_classes), ds, batch_size=8)
    assert m["test_samples"] == 24 and m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    shifted = [{"boxes": t["boxes"] + torch.tensor([2.0, 2.0, 2.0, 2.0]), "labels": t["labels"]} for t in truth]
    m = test_detection(_Oracle(shifted, ds.num_classes), ds, batch_size=8)
    assert m["map50"] > 0.5 and m["map50_95"] < 0.9
