"""A YOLO detector end to end in Python: train, prune to half the MACs, fine-tune keeping the pruned widths, measure
mAP, export to ONNX and save; the pruned model goes back into Ultralytics' own ``YOLO`` object.

The data is ``fashion-detect``, generated offline from Debian's Fashion-MNIST (``apt-get install
dataset-fashion-mnist``): 1 to 4 clothing items on textured canvases with exact boxes. The model is built from
Ultralytics' yaml (no download). Needs the detect extra (``pip install -e '.[detect]'``).
``PRUNEKIT_EXAMPLE_TINY=1``: 64 training images, one epoch per step.
"""

import copy
import os
import tempfile
from pathlib import Path

import torch

import prunekit
from prunekit.data import DetectionDataset, write_yolo_dataset
from prunekit.data.detection_io import load_yolo_dataset

os.environ.setdefault("YOLO_OFFLINE", "1")
try:
    from prunekit.models.ultralytics_io import finetune_yolo, to_yolo
except ImportError:
    raise SystemExit("this example needs the detect extra: pip install -e '.[detect]'") from None

TINY = os.environ.get("PRUNEKIT_EXAMPLE_TINY") == "1"
SIZE, TRAIN, EPOCHS, FT_EPOCHS = (64, 64, 1, 1) if TINY else (64, 1000, 30, 5)
torch.manual_seed(0)
torch.set_num_threads(1)
work = Path(tempfile.mkdtemp(prefix="prunekit-detection-"))
train_args = {"batch": 16, "workers": 0, "plots": False, "verbose": False, "seed": 0}

# data: a YOLO-format folder (data.yaml, images/, labels/) with train, val (picks the epoch) and test splits
data = write_yolo_dataset(work / "fashion-detect", image_size=SIZE, train=TRAIN, val=40, test=40)

# 1. train a YOLOv8n from scratch with Ultralytics' trainer (its loss, augmentation, EMA)
model = prunekit.create_model("ultralytics:yolov8n.yaml", num_classes=10, image_size=SIZE)
model, _ = finetune_yolo(model, data, epochs=EPOCHS, imgsz=SIZE, project=work / "train", **train_args)
dense = copy.deepcopy(model).eval()


def test_map(m: torch.nn.Module) -> float:
    """mAP50-95 on the test split, through Ultralytics' validator on the module as it is."""
    metrics = to_yolo(m).val(data=str(data), split="test", imgsz=SIZE, batch=16, workers=0, plots=False,
                             verbose=False, project=str(work / "val"))
    return float(metrics.box.map)


print(f"dense: {prunekit.count_macs(dense, torch.rand(1, 3, SIZE, SIZE)) / 1e6:.1f} M MACs, "
      f"test mAP50-95 {test_map(dense):.3f}")

# 2. prune to half the MACs: calibration on training images (B, 3, H, W), never on the test split
train_images = DetectionDataset(load_yolo_dataset(data, "train"))
calib = [torch.stack([train_images[i][0] for i in range(b * 16, (b + 1) * 16)]) for b in range(4)]
model.eval()
report = prunekit.prune(model, torch.rand(1, 3, SIZE, SIZE), criterion="variance", target_macs=0.5, calib_data=calib)
print(report.summary())
print(f"pruned: {report.macs_after / 1e6:.1f} M MACs ({100 * report.macs_kept:.0f}% kept), "
      f"test mAP50-95 {test_map(model):.3f}")

# 3. fine-tune keeping the pruned widths (teacher=dense adds Ultralytics' feature distillation from the dense model)
model.criterion = None  # the loss cached by the first fit was built under inference mode; a fresh one is made
model, _ = finetune_yolo(model, data, epochs=FT_EPOCHS, imgsz=SIZE, project=work / "ft", **train_args)
print(f"fine-tuned: test mAP50-95 {test_map(model):.3f}")

# 4. the output shapes are the dense model's: the head's box/DFL and class layers kept their size
x = torch.rand(2, 3, SIZE, SIZE)
with torch.no_grad():
    assert model.eval()(x)[0].shape == dense(x)[0].shape  # (B, 4 + classes, anchors)
print(f"output (B, 4 + classes, anchors): {tuple(model(x)[0].shape)}")

# 5. export through Ultralytics (decoded predictions, as it exports any YOLO) and save without pickles
onnx_path = to_yolo(model).export(format="onnx", imgsz=SIZE, simplify=False, file=work / "pruned.onnx")
print(f"exported {Path(onnx_path).name}")
prunekit.save_model(work / "pruned", model)  # model.safetensors + model.json
reloaded = prunekit.load_model(work / "pruned").eval()
with torch.no_grad():
    torch.testing.assert_close(reloaded(x)[0], model(x)[0])
print(f"reloaded from {work / 'pruned'}: same outputs")
