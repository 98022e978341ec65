"""Export: ONNX Runtime / TorchScript / torch.export outputs equal torch for a pruned CNN, a pruned small ViT and a
pruned BERT-style encoder (dict inputs); a corrupted export fails verification; an unsupported operator is named
with its module; the CLI writes the documented files and gives one clear error per user mistake."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import onnx
import pytest
import torch
import torch_pruning as tp
from onnx import numpy_helper
from torch import nn

import prunekit
from prunekit import runs
from prunekit.cli.main import main
from prunekit.errors import ConfigError, ExportError
from prunekit.export import FORMATS, ExportOptions, export_model, verify_file
from prunekit.export.stage import verification_inputs

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _fresh_console_logging():
    """``cli.main`` binds its console handler to the sys.stdout of the test that first called it; drop it after each
    test so a later test's capsys does not see 'Logging error' tracebacks from a closed stream."""
    yield
    logger = logging.getLogger("prunekit")
    for h in [h for h in logger.handlers if getattr(h, "_prunekit_console", False)]:
        logger.removeHandler(h)


def make_run(d: Path, model: nn.Module, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    runs.save_model(d, model)
    runs.write_config(d, config or {})
    runs.write_metrics(d, {"top1": 0.0, "stage": "prune"})
    (d / runs.LOG).write_text("pruned\n")
    return d


def prune_linears(model: nn.Module, inputs, linears: list[nn.Linear], keep: float = 0.5) -> None:
    """Remove the last (1 - keep) output features of each linear (and what depends on them)."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
    for lin in linears:
        n = lin.out_features
        dg.get_pruning_group(lin, tp.prune_linear_out_channels, idxs=list(range(int(n * keep), n))).prune()


@pytest.fixture(scope="module")
def pruned_cnn():
    torch.manual_seed(0)
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10).eval()
    model.prunekit_spec.input = {"kind": "image", "shape": [1, 1, 16, 16]}
    x = runs.example_inputs(model.prunekit_spec, 1)
    tp.pruner.MetaPruner(model, x, tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                         ignored_layers=[model.classifier]).step()
    for m in model.modules():  # non-trivial BN statistics, so a wrong fold would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    assert model.features[0].out_channels == 16
    return model


@pytest.fixture(scope="module")
def cnn_exports(pruned_cnn, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn_export")
    x = runs.example_inputs(pruned_cnn.prunekit_spec, 2)
    xv = runs.example_inputs(pruned_cnn.prunekit_spec, 3, seed=7)
    manifest = export_model(pruned_cnn, x, out, ["onnx", "torchscript", "exported"], verify_inputs=xv)
    return out, manifest


def test_pruned_cnn_all_formats_match_torch(pruned_cnn, cnn_exports):
    out, manifest = cnn_exports
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.torchscript.pt", "model.pt2", "export.json"}
    assert json.loads((out / "export.json").read_text())["formats"].keys() == {"onnx", "torchscript", "exported"}
    onnx_info = manifest["formats"]["onnx"]
    assert onnx_info["exporter"] == "dynamo" and onnx_info["opset"] == 18 and onnx_info["input_names"] == ["input"]
    for name, info in manifest["formats"].items():
        assert info["verify"]["ok"] and info["verify"]["max_abs_diff"] < ATOL, name
        assert info["verify"]["batch_size"] == 3
    # the reloaded artifacts, on another batch size (1), against torch: the batch axis is dynamic
    x1 = runs.example_inputs(pruned_cnn.prunekit_spec, 1, seed=3)
    with torch.no_grad():
        ref = pruned_cnn(x1)
    for name in ("onnx", "torchscript", "exported"):
        got = FORMATS.get(name).load(out / FORMATS.get(name).filename)(x1)[0]
        torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_old_opset_uses_the_torchscript_exporter(pruned_cnn, tmp_path):
    """torch 2.14's default (dynamo) exporter cannot write opset < 18 (it silently writes 18): we switch exporters."""
    x = runs.example_inputs(pruned_cnn.prunekit_spec, 2)
    xv = runs.example_inputs(pruned_cnn.prunekit_spec, 3, seed=7)
    manifest = export_model(pruned_cnn, x, tmp_path, ["onnx"], ExportOptions(opset=17), verify_inputs=xv)
    info = manifest["formats"]["onnx"]
    assert info["exporter"] == "torchscript" and info["opset"] == 17
    assert info["verify"]["ok"] and info["verify"]["max_abs_diff"] < ATOL
    assert onnx.load(str(tmp_path / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_corrupted_export_fails_verification(pruned_cnn, cnn_exports, tmp_path):
    out, _ = cnn_exports
    m = onnx.load(str(out / "model.onnx"))
    init = max(m.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    arr = numpy_helper.to_array(init).copy()
    arr += 0.05
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "model.onnx"
    onnx.save(m, str(bad))
    xv = runs.example_inputs(pruned_cnn.prunekit_spec, 3, seed=7)
    v = verify_file("onnx", bad, pruned_cnn, xv)
    assert not v.ok and v.max_abs_diff > ATOL
    assert "onnx: FAILED: max abs diff" in v.summary()
    assert verify_file("onnx", out / "model.onnx", pruned_cnn, xv).ok  # the intact file still passes


def test_pruned_vit_run_dir_onnx_matches_torch(tmp_path):
    torch.manual_seed(0)
    vit = prunekit.create_model("timm:test_vit", in_channels=1, num_classes=10, img_size=32).eval()
    x = runs.example_inputs(vit.prunekit_spec, 2)
    hidden = vit.blocks[0].mlp.fc1.out_features
    prune_linears(vit, x, [b.mlp.fc1 for b in vit.blocks])
    run = make_run(tmp_path / "vit", vit)
    assert main(["export", "--from", str(run), "--format", "onnx", "--verify"]) == 0
    info = json.loads((run / "export" / "export.json").read_text())["formats"]["onnx"]
    assert info["verify"]["ok"] and info["verify"]["max_abs_diff"] < ATOL and info["verify"]["shapes"] == [[3, 10]]
    # the ONNX model against the model rebuilt from the run directory, on another batch size
    rebuilt = runs.load_model(run)
    assert rebuilt.blocks[0].mlp.fc1.out_features == hidden // 2
    x1 = runs.example_inputs(rebuilt.prunekit_spec, 1, seed=4)
    v = verify_file("onnx", run / "export" / "model.onnx", rebuilt, x1)
    assert v.ok and v.max_abs_diff < ATOL, v.summary()


def test_pruned_bert_run_dir_dict_inputs_all_formats(tmp_path):
    torch.manual_seed(0)
    cfg = dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               vocab_size=100, max_position_embeddings=64)
    bert = prunekit.create_model("hf:tiny-bert", hf_config=cfg, task="feature-extraction").eval()
    spec = bert.prunekit_spec
    prune_linears(bert, runs.example_inputs(spec, 2), [layer.intermediate.dense for layer in bert.model.encoder.layer])
    run = make_run(tmp_path / "bert", bert)
    xv, desc = verification_inputs(run, spec, 3)
    assert xv["attention_mask"][1, -1] == 0 and "padded" in desc
    assert main(["export", "--from", str(run), "--format", "onnx,exported,torchscript", "--verify"]) == 0
    manifest = json.loads((run / "export" / "export.json").read_text())
    for name, info in manifest["formats"].items():
        assert info["input_names"] == ["input_ids", "attention_mask"], name
        assert info["verify"]["ok"] and info["verify"]["max_abs_diff"] < ATOL, name
        assert info["verify"]["inputs"] == desc
    assert manifest["formats"]["onnx"]["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "sequence"}
    # another batch and sequence length than exported (dynamic batch and sequence axes)
    rebuilt = runs.load_model(run)
    assert rebuilt.model.encoder.layer[0].intermediate.dense.out_features == 32
    short = {k: v[:, :7] for k, v in runs.example_inputs(spec, 1, seed=5).items()}
    for name in ("onnx", "exported", "torchscript"):
        v = verify_file(name, run / "export" / FORMATS.get(name).filename, rebuilt, short)
        assert v.ok and v.shapes == [[1, 7, 32]], v.summary()


@torch.library.custom_op("prunekit_test::weird", mutates_args=())
def _weird(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_weird.register_fake
def _(x):
    return torch.empty_like(x)


class Weird(nn.Module):
    def forward(self, x):
        return _weird(x)


def test_unsupported_operator_names_op_and_module(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.ReLU(), Weird()), nn.Flatten())
    with pytest.raises(ExportError, match=r"operator prunekit_test\.weird \(called in 1\.1 \(Weird\)\) has no ONNX"):
        export_model(model, torch.randn(2, 1, 6, 6), tmp_path, ["onnx"], ExportOptions(onnx_exporter="dynamo"))


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cnn_run(pruned_cnn, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "pruned", pruned_cnn, {"dataset": "digits", "image_size": 16})


def test_cli_export_into_source_dir(cnn_run, capsys):
    before = {p.name: p.read_bytes() for p in cnn_run.iterdir() if p.is_file()}
    assert main(["export", "--from", str(cnn_run), "--format", "onnx,exported", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verified: max abs diff" in printed
    assert {p.name for p in cnn_run.iterdir()} == set(before) | {"export"}
    assert {p.read_bytes() for p in cnn_run.iterdir() if p.is_file()} == set(before.values())  # run untouched
    ex = cnn_run / "export"
    assert {p.name for p in ex.iterdir()} == {"model.onnx", "model.pt2", "export.json", "log.txt"}
    manifest = json.loads((ex / "export.json").read_text())
    assert manifest["from"] == str(cnn_run) and manifest["config"]["format"] == ["onnx", "exported"]
    for info in manifest["formats"].values():
        assert info["verify"]["ok"] and info["verify"]["inputs"] == "digits val images"


def test_cli_export_to_new_run_dir(cnn_run, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--from", str(cnn_run), "--format", "torchscript", "--out", str(out), "--verify"]) == 0
    assert runs.RUN_FILES | {"export"} == {p.name for p in out.iterdir()}
    assert runs.read_metrics(out)["exported_from"] == str(cnn_run)
    assert (out / runs.WEIGHTS).read_bytes() == (cnn_run / runs.WEIGHTS).read_bytes()
    assert {p.name for p in (out / "export").iterdir()} == {"model.torchscript.pt", "export.json"}
    assert "export: torchscript: wrote" in (out / runs.LOG).read_text()
    loaded = runs.load_model(out)  # still a loadable run directory
    assert loaded.features[0].out_channels == 16


def test_cli_verify_fails_on_corrupted_export(cnn_run, tmp_path, monkeypatch, capsys):
    """An exporter that writes wrong weights (simulated) makes --verify exit non-zero and print the difference."""
    fmt = FORMATS.get("torchscript")
    original = fmt.export

    def corrupting(module, args, names, outs, path, options, prefix=""):
        bad = copy.deepcopy(module)
        with torch.no_grad():
            bad.classifier.bias.add_(0.5)
        return original(bad, args, names, outs, path, options, prefix)

    monkeypatch.setattr(fmt, "export", corrupting)
    out = tmp_path / "bad"
    rc = main(["export", "--from", str(cnn_run), "--format", "torchscript", "--out", str(out), "--verify"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--verify failed" in err and "torchscript: FAILED: max abs diff 0.5" in err
    manifest = json.loads((out / "export" / "export.json").read_text())
    assert manifest["formats"]["torchscript"]["verify"]["ok"] is False


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx,tflite"], "unknown export format 'tflite'.*Valid export format.*: exported, onnx, torchscript"),
    (["--format", "onnx", "--opset", "13", "--onnx-exporter", "dynamo"], "--opset 13: the dynamo ONNX exporter"),
    (["--onnx-exporter", "legacy"], "--onnx-exporter.*unknown ONNX exporter 'legacy'"),
    (["--atol", "0"], "--atol"),
])
def test_cli_bad_options(cnn_run, capsys, argv, message):
    rc = main(["export", "--from", str(cnn_run), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert re.search(message, err), err


def test_cli_missing_run_dir_and_same_out(cnn_run, tmp_path, capsys):
    assert main(["export", "--from", str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--from", str(cnn_run), "--out", str(cnn_run)]) == 2
    assert "same folder as --from" in capsys.readouterr().err


def test_export_model_rejects_non_tensor_inputs(tmp_path):
    with pytest.raises(ExportError, match="example inputs must be a tensor"):
        export_model(nn.Linear(2, 2), "text", tmp_path, ["onnx"])
    with pytest.raises(ConfigError, match="unknown export format 'onnxx'; did you mean 'onnx'"):
        export_model(nn.Linear(2, 2), torch.randn(2, 2), tmp_path, ["onnxx"])


def test_a_batch_1_example_exports_with_a_dynamic_batch(tmp_path):
    """The example a model is pruned with is usually batch 1; torch.export would fix that size (it specialises
    size-1 dimensions), so the export traces on the example repeated to batch 2 and the batch axis stays dynamic."""
    torch.manual_seed(0)
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10).eval()
    manifest = export_model(model, torch.randn(1, 1, 16, 16), tmp_path, ["onnx", "exported"],
                            verify_inputs=torch.randn(3, 1, 16, 16))
    assert all(info["verify"]["ok"] and info["verify"]["batch_size"] == 3 for info in manifest["formats"].values())
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cli_exports_a_folder_written_by_save_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10).eval()
    model.prunekit_spec.input = {"kind": "image", "shape": [1, 1, 16, 16]}
    prunekit.save_model(tmp_path / "saved", model)
    assert main(["export", "--from", str(tmp_path / "saved"), "--format", "onnx", "--verify",
                 "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / runs.METRICS).read_text()) == {"exported_from": str(tmp_path / "saved")}
    assert (tmp_path / "exp" / "export" / "model.onnx").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["export", "--from", str(tmp_path / "empty"), "--format", "onnx"]) == 2
    assert "holds no model: missing model.json, model.safetensors" in capsys.readouterr().err


class _TakesExtraArgs(nn.Module):
    """Ultralytics' signature: ``forward(x, *args, **kwargs)`` (a YOLO model), called with one input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.conv(x).flatten(1)


def test_forward_with_star_args_exports_with_torch_export_silently(tmp_path, caplog):
    """The dynamic-shape spec follows the signature (``x`` then ``*args``): torch.export takes it, so the export needs
    no fallback to the TorchScript-based exporter and logs no failure."""
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        manifest = export_model(_TakesExtraArgs().eval(), torch.randn(1, 3, 8, 8), tmp_path, ["onnx"],
                                verify_inputs=torch.randn(3, 3, 8, 8))
    info = manifest["formats"]["onnx"]
    assert info["exporter"] == "dynamo" and info["verify"]["ok"] and info["verify"]["batch_size"] == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert onnx.load(str(tmp_path / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_verify_default_tolerance_is_relative_for_large_outputs():
    """An export whose outputs are ~100 and differ from torch's by a float32 rounding (relative 4e-5) verifies by
    default (a timm EfficientNet failed with an absolute tolerance alone); a real discrepancy still fails."""
    from prunekit.export.core import verify_runner

    model = torch.nn.Linear(4, 3).eval()
    with torch.no_grad():
        model.bias.fill_(100.0)
    x = torch.randn(2, 4)
    close = verify_runner("onnx", lambda a: [model(a) * (1 + 4e-5)], model, x)
    assert close.ok and close.max_abs_diff > 1e-3
    assert not verify_runner("onnx", lambda a: [model(a) * (1 + 4e-5)], model, x, rtol=0.0).ok
    assert not verify_runner("onnx", lambda a: [model(a) + 0.5], model, x).ok
