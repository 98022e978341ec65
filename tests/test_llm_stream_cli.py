"""``prunekit prune-llm --stream`` and ``prunekit sparsify --stream``: the same model folder as without ``--stream``,
written one decoder layer at a time; what needs the whole model is one clear error."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.cli.main import main  # noqa: E402
from prunekit.pruning.llm.stream_io import ShardReader  # noqa: E402


@pytest.fixture()
def folder(tmp_path):
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(c).save_pretrained(tmp_path / "dense", max_shard_size="30KB")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    return tmp_path / "dense", text


def load(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_prune_llm_stream_equals_the_in_memory_run(folder, tmp_path):
    dense, text = folder
    args = ["prune-llm", "--from", str(dense), "--calib-text", str(text), "--seq-len", "16", "--calib-samples", "8",
            "--drop-layers", "1", "--mlp-ratio", "0.5", "--compensate", "lstsq"]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, "--stream", "--out", str(tmp_path / "st")]) == 0
    written = {p.name for p in (tmp_path / "st").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "prune_report.json", "metrics.json"} <= written
    assert ".depth-stream" not in written  # the depth step's folder is removed
    mem, st = (json.loads((tmp_path / d / "prune_report.json").read_text()) for d in ("mem", "st"))
    assert st["depth"]["dropped"] == mem["depth"]["dropped"]
    assert (st["params_before"], st["params_after"]) == (mem["params_before"], mem["params_after"])
    metrics = json.loads((tmp_path / "st" / "metrics.json").read_text())
    assert metrics["stream"] and metrics["max_resident_layers"] == 1
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(load(tmp_path / "st")(input_ids=x).logits, load(tmp_path / "mem")(input_ids=x).logits,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra,flag", [(["--eval-text", "T"], "--eval-text"), (["--kd-steps", "2"], "--kd-steps"),
                                        (["--depth-criterion", "loss"], "--depth-criterion loss"),
                                        (["--hidden-ratio", "0.25"], "--hidden-ratio")])
def test_prune_llm_stream_refuses_what_needs_the_whole_model(folder, tmp_path, capsys, extra, flag):
    dense, text = folder
    extra = [str(text) if e == "T" else e for e in extra]
    size = [] if flag == "--hidden-ratio" else ["--drop-layers", "1"]
    code = main(["prune-llm", "--from", str(dense), "--calib-text", str(text), "--seq-len", "16", *size, *extra,
                 "--stream", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--stream cannot do {flag}" in err and "drop" in err
    assert not (tmp_path / "o" / "config.json").exists()


def test_sparsify_stream_equals_the_in_memory_run(folder, tmp_path, capsys):
    dense, text = folder
    args = ["sparsify", "--from", str(dense), "--method", "sparsegpt", "--nm", "2:4", "--calib-text", str(text),
            "--calib-samples", "8", "--seq-len", "16", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, "--stream", "--out", str(tmp_path / "st")]) == 0
    want = load(tmp_path / "mem").state_dict()
    for k, v in load(tmp_path / "st").state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
    m = json.loads((tmp_path / "st" / "metrics.json").read_text())
    assert m["stream"] and abs(m["sparsity"] - 0.5) < 1e-9 and len(m["layers"]) == 28 and m["calib_tokens"] == 128
    assert {"sparsity_report.json", "config.yaml"} <= {p.name for p in (tmp_path / "st").iterdir()}
    assert main([*args, "--stream", "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    stored = ShardReader(tmp_path / "bf16").load(["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"])
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # layers in --dtype
    assert stored["model.embed_tokens.weight"].dtype == torch.float32  # the rest copied as stored
    capsys.readouterr()
    assert main([*args, "--stream", "--eval-text", str(text), "--out", str(tmp_path / "e")]) == 2
    assert "--stream cannot do --eval-text" in capsys.readouterr().err
    assert main(["sparsify", "--from", str(tmp_path / "no_run"), "--method", "l1", "--stream",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--stream" in capsys.readouterr().err
