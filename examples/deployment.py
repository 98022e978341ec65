"""Deployment on a CPU: latency per runtime, channel rounding, int8.

Latency is timed *alternately* (dense and pruned in the same run, so a busy machine slows both alike) on eager
PyTorch and ONNX Runtime. Kept channel counts rounded to the CPU's SIMD block (``round_to``) turn more of the MACs cut
into latency. Last, static int8 for ONNX Runtime with ``prunekit.quantize``. ``PRUNEKIT_EXAMPLE_TINY=1``: fewer
epochs and timed runs.
"""

import copy
import os
import tempfile

import torch

import prunekit
from prunekit.data import get_dataset, make_loader
from prunekit.measure.hardware import recommended_round_to
from prunekit.measure.latency import compare_latency

TINY = os.environ.get("PRUNEKIT_EXAMPLE_TINY") == "1"
EPOCHS, SAMPLES, RUNS = (0, 200, 5) if TINY else (5, None, 200)  # tiny: untrained, for the timings only
torch.manual_seed(0)
torch.set_num_threads(1)


def loader(split: str) -> torch.utils.data.DataLoader:
    limit = SAMPLES if split in ("train", "calib") else None
    return make_loader(get_dataset("digits", split, limit=limit), batch_size=64, shuffle=split == "train", seed=0)


train, val, test, calib = (loader(s) for s in ("train", "val", "test", "calib"))
dense = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
if EPOCHS:
    prunekit.fit(dense, train, val, prunekit.TrainSettings(epochs=EPOCHS, lr=0.1))
dense.eval()
x = torch.randn(1, 1, 16, 16)  # batch 1: the latency of one request

# the same pruning twice: kept channels as they fall, and rounded to the SIMD block of this CPU
block = recommended_round_to("onnxruntime")
variants = {"dense": dense}
for name, round_to in (("pruned", 1), (f"round_to {block}", block)):
    model = copy.deepcopy(dense)
    prunekit.prune(model, x, criterion="l2", target_macs=0.5, scope="local", round_to=round_to, calib_data=calib,
                   calib_batches=4)
    variants[name] = model.eval()

macs = {name: prunekit.count_macs(m, x) for name, m in variants.items()}
for backend in ("eager", "onnxruntime"):
    stats = compare_latency(variants, x, backend=backend, runs=RUNS, threads=1)
    base = stats["dense"].median_ms
    for name, s in stats.items():
        cut_macs, cut_latency = 1 - macs[name] / macs["dense"], 1 - s.median_ms / base
        print(f"{backend:11s} {name:12s} {s.median_ms:7.3f} ms  MACs cut {cut_macs:5.1%}  latency cut "
              f"{cut_latency:6.1%}" + (f"  efficiency {cut_latency / cut_macs:.2f}" if cut_macs else ""))

# static int8 of the rounded model for ONNX Runtime: QDQ, per-channel weights, ranges from the calibration batches
out = tempfile.mkdtemp(prefix="prunekit-int8-")
q = prunekit.quantize(variants[f"round_to {block}"], x, backend="onnxruntime", calib_data=calib, out=out,
                      eval_data=test)
print(f"int8: {q.int8_path} is {q.size_ratio:.2f} of the float file; top-1 float {q.accuracy_float['top1']:.2f}% "
      f"-> int8 {q.accuracy_int8['top1']:.2f}% (test split, ONNX Runtime)")
