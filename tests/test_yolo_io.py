"""A pruned YOLO back in Ultralytics: ``to_yolo`` predicts, validates and exports it (ONNX equal to torch), and
``finetune_yolo`` trains it with Ultralytics' trainer keeping every pruned width, writing no pickle. A yolov8n at
64 px with 2 classes, pruned to 60% of the MACs, and a tiny YOLO-format set written here (no network)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")
pytest.importorskip("ultralytics.nn.tasks")

import prunekit  # noqa: E402
from prunekit.errors import ConfigError  # noqa: E402
from prunekit.models.ultralytics_io import finetune_yolo, to_yolo, trainer_class  # noqa: E402

SIZE = 64
NAMES = ["red", "blue"]
COLORS = [(40, 40, 220), (220, 60, 40)]  # BGR, as the images are read by cv2


def _write_split(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    """``count`` images of SIZE px with 1-3 filled rectangles (class = colour) and their YOLO label files."""
    from PIL import Image

    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(count):
        img = rng.integers(90, 140, size=(SIZE, SIZE, 3), dtype=np.uint8)  # textured grey background
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(0, len(NAMES)))
            w, h = (int(v) for v in rng.integers(12, 30, size=2))
            x0, y0 = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            img[y0:y0 + h, x0:x0 + w] = COLORS[cls][::-1]  # RGB for PIL
            lines.append(f"{cls} {(x0 + w / 2) / SIZE:.6f} {(y0 + h / 2) / SIZE:.6f} {w / SIZE:.6f} {h / SIZE:.6f}")
        Image.fromarray(img).save(root / "images" / split / f"{i}.png")
        (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    """A YOLO-format set: 8 train and 4 val images, ``data.yaml`` with two class names."""
    root = tmp_path_factory.mktemp("yolo_data")
    rng = np.random.default_rng(0)
    _write_split(root, "train", 8, rng)
    _write_split(root, "val", 4, rng)
    path = root / "data.yaml"
    path.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    return path


def _pruned(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = prunekit.create_model("ultralytics:yolov8n.yaml", num_classes=len(NAMES), image_size=SIZE).eval()
    prunekit.prune(model, torch.randn(1, 3, SIZE, SIZE), criterion="l2", target_macs=0.6)
    return model


def _widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _has_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    return _pruned()


def test_pruned_model_is_smaller(pruned) -> None:
    dense = prunekit.create_model("ultralytics:yolov8n.yaml", num_classes=len(NAMES), image_size=SIZE)
    assert sum(o for _, o in _widths(pruned).values()) < sum(o for _, o in _widths(dense).values())


def test_predict_keeps_the_pruned_model(pruned, tmp_path) -> None:
    """predict on a numpy image works; the module is the YOLO's own and stays unfused (Ultralytics fuses a copy)."""
    widths, bns, state = _widths(pruned), _has_bn(pruned), {k: v.clone() for k, v in pruned.state_dict().items()}
    yolo = to_yolo(pruned, names=NAMES)
    assert yolo.model is pruned and yolo.task == "detect" and yolo.names == dict(enumerate(NAMES))
    image = np.full((SIZE, SIZE, 3), 120, dtype=np.uint8)
    results = yolo.predict(image, imgsz=SIZE, conf=0.0, verbose=False, project=str(tmp_path))
    assert len(results) == 1 and results[0].boxes is not None
    assert results[0].orig_shape == (SIZE, SIZE)
    assert yolo.model is pruned and _widths(pruned) == widths and _has_bn(pruned) == bns > 0
    for k, v in pruned.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=0, rtol=0)


def test_val_returns_map(pruned, data_yaml, tmp_path) -> None:
    yolo = to_yolo(pruned, names=NAMES)
    metrics = yolo.val(data=str(data_yaml), imgsz=SIZE, batch=4, workers=0, plots=False, verbose=False,
                       project=str(tmp_path))
    assert 0.0 <= metrics.box.map50 <= 1.0 and 0.0 <= metrics.box.map <= metrics.box.map50 + 1e-9
    assert _has_bn(pruned) > 0  # not fused by the validator


def test_export_onnx_matches_torch(pruned, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    yolo = to_yolo(pruned, names=NAMES)
    path = Path(yolo.export(format="onnx", imgsz=SIZE, simplify=False, file=tmp_path / "pruned.onnx"))
    assert path == tmp_path / "pruned.onnx" and path.is_file()
    assert _has_bn(pruned) > 0  # fused in the exporter's copy only
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = pruned.eval()(x)[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)


def test_finetune_keeps_pruned_widths(data_yaml, tmp_path) -> None:
    """One epoch of Ultralytics' trainer: every conv keeps its pruned width, the weights change, no pickle is
    written, and the trained model saves and rebuilds through safetensors."""
    model = _pruned(seed=1)
    widths, before = _widths(model), {k: v.clone() for k, v in model.state_dict().items()}
    trained, metrics = finetune_yolo(model, data_yaml, epochs=1, imgsz=SIZE, project=tmp_path / "runs", batch=4,
                                     workers=0, plots=False, val=False, amp=False, warmup_epochs=0, seed=0)
    assert _widths(trained) == widths
    assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items() if v.is_floating_point())
    assert "metrics/mAP50(B)" in metrics and 0.0 <= metrics["metrics/mAP50(B)"] <= 1.0
    assert not list((tmp_path / "runs").rglob("*.pt"))
    prunekit.save_model(tmp_path / "model", trained)
    rebuilt = prunekit.load_model(tmp_path / "model").eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], trained.eval()(x)[0])


def test_user_errors(pruned, data_yaml, tmp_path) -> None:
    with pytest.raises(ConfigError, match="names: 3 given"):
        to_yolo(pruned, names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="expected an Ultralytics model"):
        to_yolo(nn.Conv2d(3, 3, 1))
    with pytest.raises(ConfigError, match="no such file"):
        finetune_yolo(pruned, tmp_path / "missing.yaml", epochs=1)
    three = prunekit.create_model("ultralytics:yolov8n.yaml", num_classes=3, image_size=SIZE)
    with pytest.raises(ConfigError, match="2 classes in 'names', the model's head has 3"):
        finetune_yolo(three, data_yaml, epochs=1)
    with pytest.raises(ConfigError, match="task 'nope'"):
        trainer_class("nope")
    with pytest.raises(ConfigError, match="kd='logits': valid: head, features"):
        finetune_yolo(pruned, data_yaml, epochs=1, teacher=pruned, kd="logits")


def test_finetune_with_teacher_distills(data_yaml, tmp_path) -> None:
    """With the unpruned model as teacher, Ultralytics' distillation loss is trained; the student comes back alone
    at its pruned widths and the teacher is left as it was."""
    torch.manual_seed(2)
    teacher = prunekit.create_model("ultralytics:yolov8n.yaml", num_classes=len(NAMES), image_size=SIZE)
    student = copy.deepcopy(teacher).eval()
    prunekit.prune(student, torch.randn(1, 3, SIZE, SIZE), criterion="l2", target_macs=0.6)
    widths, teacher_state = _widths(student), {k: v.clone() for k, v in teacher.state_dict().items()}
    yolo = to_yolo(student)
    yolo.train(teacher=teacher, data=str(data_yaml), epochs=1, imgsz=SIZE, project=str(tmp_path), batch=4, workers=0,
               plots=False, val=False, amp=False, warmup_epochs=0, seed=0)
    assert any("dis" in n for n in yolo.trainer.loss_names)
    assert type(yolo.trainer.model).__name__ == "HeadDistillationModel"  # the default kd="head"
    assert yolo.trainer.args.dis == 1.0
    assert type(yolo.model) is type(teacher) and _widths(yolo.model) == widths
    assert all(p.requires_grad for n, p in teacher.named_parameters() if ".dfl" not in n)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k], atol=0, rtol=0)
    assert not list(tmp_path.rglob("*.pt"))
    # the student exports as it is (no distillation hook left on it) and trains again (no stale loss object)
    assert not any(type(h).__name__ == "FeatureHook" for m in yolo.model.modules() for h in m._forward_hooks.values())
    to_yolo(yolo.model).export(format="onnx", imgsz=SIZE, file=tmp_path / "student.onnx")
    assert (tmp_path / "student.onnx").is_file()
    again, _ = finetune_yolo(yolo.model, data_yaml, epochs=1, imgsz=SIZE, batch=4, workers=0, plots=False,
                             val=False, amp=False, warmup_epochs=0, seed=0, project=str(tmp_path / "again"))
    assert _widths(again) == widths


def _batch(n: int = 2) -> dict[str, torch.Tensor]:
    """A training batch as Ultralytics' trainer hands it to the model: images and one box per image."""
    g = torch.Generator().manual_seed(0)
    return {"img": torch.rand(n, 3, SIZE, SIZE, generator=g), "batch_idx": torch.arange(n).float(),
            "cls": torch.zeros(n, 1), "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]]).repeat(n, 1)}


def test_head_kd_loss_is_zero_at_the_teacher_and_pulls_towards_it() -> None:
    from prunekit.models.ultralytics_io import head_kd_loss

    g = torch.Generator().manual_seed(0)
    teacher = {"scores": torch.randn(2, 3, 40, generator=g), "boxes": torch.randn(2, 4 * 16, 40, generator=g)}
    same = {k: v.clone() for k, v in teacher.items()}
    torch.testing.assert_close(head_kd_loss(same, teacher, 16), torch.tensor(0.0), atol=1e-5, rtol=0)
    student = {k: (v + 0.5 * torch.randn(v.shape, generator=g)).requires_grad_() for k, v in teacher.items()}
    loss = head_kd_loss(student, teacher, 16)
    assert loss > 0.01
    loss.backward()
    stepped = {k: v.detach() - 0.5 * v.grad for k, v in student.items()}  # one gradient step towards the teacher
    assert head_kd_loss(stepped, teacher, 16) < loss
    # only the box distributions differ: the loss counts them where the teacher sees an object
    boxes_only = {"scores": teacher["scores"], "boxes": student["boxes"].detach()}
    assert 0 < head_kd_loss(boxes_only, teacher, 16) < loss


def test_head_distillation_adds_a_head_loss_that_is_zero_for_the_teacher_itself() -> None:
    """HeadDistillationModel: the student's detection loss as it is, plus ``dis`` x the head KD, which is 0 for a
    student equal to the teacher (BatchNorm in eval for both) and > 0 once the student's class layer moves."""
    from ultralytics.cfg import get_cfg

    from prunekit.models.ultralytics_io import head_distillation_class

    torch.manual_seed(3)
    teacher = prunekit.create_model("ultralytics:yolov8n.yaml", num_classes=len(NAMES), image_size=SIZE).eval()
    student = copy.deepcopy(teacher)
    student.args = get_cfg(overrides={"imgsz": SIZE, "dis": 2.0})
    model = head_distillation_class()(teacher_model=copy.deepcopy(teacher), student_model=student).train()
    for m in student.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # the teacher runs in eval: the same statistics, so the same outputs
    batch = _batch()
    loss, items = model.loss(batch)
    regular, _ = student.loss(batch)
    assert loss.shape == (4,) and float(items["dis_loss"]) == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(loss[:3], regular)
    with torch.no_grad():
        student.model[-1].cv3[0][-1].bias.add_(1.0)  # the class logits of the first level move
    loss, items = model.loss(batch)
    n = batch["img"].shape[0]  # Ultralytics' trainer takes each loss times the batch size
    assert float(items["dis_loss"]) > 0.01
    assert float(loss[3].detach()) == pytest.approx(n * float(items["dis_loss"]), rel=1e-5)
