"""A CNN end to end with the Python API: train, prune, recover, export, report.

ResNet-20 on scikit-learn's bundled handwritten digits (16 px, no download). Run it as it is (about a minute on two
CPU cores), or with ``PRUNEKIT_EXAMPLE_TINY=1`` for the few-second version the tests run.
"""

import copy
import os
import tempfile

import torch

import prunekit
from prunekit.data import get_dataset, make_loader
from prunekit.export.core import ExportOptions
from prunekit.export.stage import export_model
from prunekit.measure.latency import compare_latency

TINY = os.environ.get("PRUNEKIT_EXAMPLE_TINY") == "1"
EPOCHS, FT_EPOCHS, SAMPLES = (1, 1, 400) if TINY else (8, 3, None)
torch.manual_seed(0)
torch.set_num_threads(1)


def loader(split: str, shuffle: bool = False) -> torch.utils.data.DataLoader:
    limit = SAMPLES if split in ("train", "calib") else None
    return make_loader(get_dataset("digits", split, limit=limit), batch_size=64, shuffle=shuffle, seed=0)


train, val, test, calib = loader("train", shuffle=True), loader("val"), loader("test"), loader("calib")

# 1. train: the best epoch is picked on val; test is only reported
model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
prunekit.fit(model, train, val, prunekit.TrainSettings(epochs=EPOCHS, lr=0.1, warmup_epochs=0.2))
dense = prunekit.evaluate(model, test)

# 2. prune: half the MACs, channels scored by variance, the consumers refitted (lstsq), BatchNorm re-estimated
x = torch.randn(1, 1, 16, 16)
dense_copy = copy.deepcopy(model)
report = prunekit.prune(model, x, criterion="variance", target_macs=0.5, calib_data=calib, calib_batches=4)
print(report.summary())
pruned = prunekit.evaluate(model, test)

# 3. recover: a short fine-tune; the pruned model itself is a candidate, so it never ends below its start
prunekit.fit(model, train, val, prunekit.TrainSettings(epochs=FT_EPOCHS, lr=0.05), start_candidate=True,
             phase="finetune")
tuned = prunekit.evaluate(model, test)

# 4. export (ONNX, checked against torch on fresh inputs) and save (safetensors + model.json, no pickle)
out = tempfile.mkdtemp(prefix="prunekit-cnn-")
fast = ExportOptions(onnx_exporter="torchscript")  # TorchScript-based; the default tries torch.export first
manifest = export_model(model, torch.randn(2, 1, 16, 16), f"{out}/export", ["onnx"], fast,
                        verify_inputs=torch.randn(3, 1, 16, 16))
prunekit.save_model(f"{out}/pruned", model)
again = prunekit.load_model(f"{out}/pruned")

# 5. report: top-1 on test, MACs, params and latency timed alternately
times = compare_latency({"dense": dense_copy.eval(), "pruned": model.eval()}, x, runs=20, threads=1)
for name, m, top1 in (("dense", dense_copy, dense["top1"]), ("pruned", model, pruned["top1"]),
                      ("fine-tuned", model, tuned["top1"])):
    stats = times["dense" if name == "dense" else "pruned"]
    print(f"{name:10s} top-1 {top1:6.2f}%  MACs {prunekit.count_macs(m, x) / 1e6:6.2f} M  "
          f"params {prunekit.count_params(m) / 1e3:6.1f} K  latency {stats.median_ms:.3f} ms")
print("ONNX verified:", manifest["formats"]["onnx"]["verify"]["ok"], "| files in", out)
torch.testing.assert_close(again.eval()(x), model(x))  # the reloaded model is the pruned one
