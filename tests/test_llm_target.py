"""One size target (prunekit.pruning.llm.search) and the KD recovery of prune-llm (prunekit.train.lm_kd,
prunekit.pipeline.llm_kd) on tiny random Llama / Qwen2 configs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import ConfigError  # noqa: E402
from prunekit.pipeline import llm_kd  # noqa: E402
from prunekit.pipeline.llm import PruneLLMConfig, prune_llm_run  # noqa: E402
from prunekit.pruning.llm import prune_to_params  # noqa: E402
from prunekit.pruning.llm.depth import DepthConfig  # noqa: E402
from prunekit.pruning.llm.search import SHAPES, _dense, apply_shape, shape_params, solve  # noqa: E402
from prunekit.pruning.llm.width import WidthSettings  # noqa: E402
from prunekit.train.lm_kd import LMKDConfig, kl_to_teacher, lm_distill  # noqa: E402

V, T = 64, 16
CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}


def tiny(kind: str = "llama", vocab: int = V, layers: int = 4, init: float = 0.02) -> torch.nn.Module:
    torch.manual_seed(0)
    c = CONFIGS[kind](vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                      initializer_range=init)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def ids(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("target", [0.7, 30000])
def test_target_is_met_and_the_lowest_loss_candidate_is_kept(kind, target):
    model = tiny(kind)
    before = n_params(model)
    rep = prune_to_params(model, ids(), target, tolerance=0.01)
    goal = round(target * before) if target < 1 else target
    assert rep["target_count"] == goal
    assert n_params(model) == rep["params_after"]
    assert abs(rep["params_after"] - goal) <= 0.01 * goal
    scored = [c for c in rep["candidates"] if "calib_loss" in c]
    assert len(rep["candidates"]) == 5 and len(scored) >= 3  # every default shape listed, skipped ones with a reason
    best = min(scored, key=lambda c: c["calib_loss"])
    assert rep["chosen"] == best["name"] and best["chosen"] and sum(c.get("chosen", False) for c in scored) == 1
    # the model kept is the chosen candidate: same parameters, same held-out loss as when it was scored
    assert rep["params_after"] == best["params"]
    assert rep["calib_loss"] == pytest.approx(best["calib_loss"], rel=1e-5)
    for c in scored:
        assert abs(c["params"] - goal) <= 0.01 * goal, c


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_count_from_the_config_equals_the_pruned_model(name):
    model = tiny("qwen2")  # q/k/v biases
    m = _dense(model, 1)
    goal = round(0.75 * n_params(model))
    shape, n, why = solve(m, name, goal, 0.02)
    assert shape is not None, why
    apply_shape(model, shape, list(ids().split(8)), WidthSettings(), DepthConfig())
    assert n_params(model) == n == shape_params(m, shape)


def test_unreachable_or_bad_target_is_refused():
    model = tiny()
    with pytest.raises(ConfigError, match="target_params=1.5"):
        prune_to_params(model, ids(), 1.5)
    with pytest.raises(ConfigError, match="no candidate shape meets"):
        prune_to_params(model, ids(), 0.999, shapes=["mlp"], tolerance=1e-6)
    assert n_params(model) == n_params(tiny())  # unchanged


def test_target_with_an_explicit_ratio_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--target-params 0.7 and --mlp-ratio 0.5"):
        PruneLLMConfig(**{"from": tmp_path, "calib_text": tmp_path / "t.txt", "target_params": 0.7,
                          "mlp_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"--target-params 0.7 and --drop-layers 1"):
        PruneLLMConfig(**{"from": tmp_path, "calib_text": tmp_path / "t.txt", "target_params": 0.7,
                          "drop_layers": 1})
    with pytest.raises(ConfigError, match="target_shapes"):
        PruneLLMConfig(**{"from": tmp_path, "calib_text": tmp_path / "t.txt", "target_shapes": "mlp,wide"})


@pytest.fixture()
def byte_folder(tmp_path):
    """A byte-level tiny Llama folder and a text file (calibration and KD windows)."""
    tiny("llama", vocab=256).save_pretrained(tmp_path / "dense")
    words = ["the", "model", "prunes", "a", "layer", "of", "text", "and", "keeps", "its", "loss", "low"]
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    (tmp_path / "train.txt").write_text(text)
    return tmp_path


def _cfg(d, out: str, **kw) -> PruneLLMConfig:
    return PruneLLMConfig(**{"from": d / "dense", "calib_text": d / "train.txt", "eval_text": d / "train.txt",
                             "out": d / out, "calib_samples": 12, "seq_len": 24, "target_params": 0.7, **kw})


def test_prune_llm_target_writes_a_folder_plain_transformers_reloads(byte_folder):
    m = prune_llm_run(_cfg(byte_folder, "small"))
    out = byte_folder / "small"
    assert {"config.json", "model.safetensors", "prune_report.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["chosen"] in SHAPES and all("name" in c for c in rep["candidates"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert n_params(reloaded) == m["params_after"] == rep["params_after"]
    assert abs(m["params_after"] - 0.7 * m["params_before"]) <= 0.01 * 0.7 * m["params_before"]
    x = torch.randint(0, 256, (2, 20))
    assert torch.isfinite(reloaded(input_ids=x).logits).all()
    assert {"ppl_before", "ppl_after"} <= set(m)


def test_kd_lowers_the_kl_to_the_teacher():
    teacher = tiny(init=0.2)  # larger weights than the default: peaked predictions, a KL worth recovering
    student = tiny(init=0.2)
    prune_to_params(student, ids(), 0.6)
    windows = ids(8, seed=2)
    before = kl_to_teacher(student, teacher, windows)
    tokens = torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(3))
    res = lm_distill(student, teacher, tokens, LMKDConfig(kd_steps=30, kd_lr=3e-3, kd_batch=8), seq_len=T)
    after = kl_to_teacher(student, teacher, windows)
    assert after < 0.7 * before, (before, after)
    assert res["kd_steps_done"] == 30 and res["kd_loss_last"] < res["kd_loss_first"]


def test_interrupted_kd_resumes_to_the_same_weights(tmp_path):
    teacher = tiny()
    start = tiny()
    prune_to_params(start, ids(), 0.7)
    tokens = torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(3))
    s = LMKDConfig(kd_steps=7, kd_lr=3e-3, kd_batch=4, kd_every=2)
    whole = copy.deepcopy(start)
    lm_distill(whole, teacher, tokens, s, seq_len=T, ckpt_dir=tmp_path / "a")
    part = copy.deepcopy(start)
    lm_distill(part, teacher, tokens, s, seq_len=T, ckpt_dir=tmp_path / "b", stop_after=5)  # last checkpoint: 4
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["step"] == 4
    again = copy.deepcopy(start)  # a new process: the pruned model, no KD yet
    res = lm_distill(again, teacher, tokens, s, seq_len=T, ckpt_dir=tmp_path / "b")
    assert res["kd_resumed_from"] == 4
    for (n, a), (_, b) in zip(whole.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert not torch.equal(whole.state_dict()["lm_head.weight"], start.state_dict()["lm_head.weight"])
    with pytest.raises(ConfigError, match="kd_lr"):
        lm_distill(copy.deepcopy(start), teacher, tokens, s.updated({"kd_lr": 1e-3}), seq_len=T,
                   ckpt_dir=tmp_path / "b")


def test_prune_llm_kd_is_resumed_by_a_rerun(byte_folder, monkeypatch):
    kw = {"kd_steps": 6, "kd_every": 2, "kd_batch": 2, "kd_lr": 1e-3}
    whole = prune_llm_run(_cfg(byte_folder, "whole", **kw))
    assert {"ppl_before", "ppl_after", "ppl_after_kd", "kd_kl_before", "kd_kl_after"} <= set(whole)
    assert not (byte_folder / "whole" / llm_kd.KD_DIR).exists()

    real = llm_kd.lm_distill

    def killed(*a, **k):
        real(*a, **k, stop_after=3)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm_kd, "lm_distill", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_llm_run(_cfg(byte_folder, "cut", **kw))
    assert json.loads((byte_folder / "cut" / llm_kd.KD_DIR / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(llm_kd, "lm_distill", real)
    resumed = prune_llm_run(_cfg(byte_folder, "cut", **kw))
    assert resumed["kd_resumed_from"] == 2
    assert resumed["ppl_after"] == whole["ppl_after"] and resumed["kd_kl_before"] == whole["kd_kl_before"]
    a = transformers.AutoModelForCausalLM.from_pretrained(byte_folder / "whole").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(byte_folder / "cut").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_cli_target_and_kd(byte_folder, capsys):
    from prunekit.cli.main import main

    d = byte_folder
    args = ["prune-llm", "--from", str(d / "dense"), "--calib-text", str(d / "train.txt"), "--eval-text",
            str(d / "train.txt"), "--seq-len", "24", "--calib-samples", "12", "--target-params", "0.7",
            "--target-shapes", "mlp,mlp+hidden", "--kd-steps", "4", "--kd-batch", "2", "--out", str(d / "cli")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "after KD" in out and "KD step 4/4" in out
    m = json.loads((d / "cli" / "metrics.json").read_text())
    rep = json.loads((d / "cli" / "prune_report.json").read_text())
    assert [c["name"] for c in rep["candidates"]] == ["mlp", "mlp+hidden"] and m["kd_steps_done"] == 4
    assert main([*args[:-2], "--mlp-ratio", "0.5", "--out", str(d / "cli2")]) != 0
    assert "--target-params 0.7 and --mlp-ratio 0.5" in capsys.readouterr().err


def test_kd_trains_a_student_copied_from_a_frozen_model_and_leaves_the_teacher_as_it_was():
    teacher = tiny(init=0.2)
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)  # every parameter requires_grad=False, as a copy of a frozen model has
    prune_to_params(student, ids(), 0.7)
    w = {k: v.clone() for k, v in student.state_dict().items()}
    tokens = torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(3))
    lm_distill(student, teacher, tokens, LMKDConfig(kd_steps=3, kd_lr=1e-3, kd_batch=2), seq_len=T)
    assert not torch.equal(w["lm_head.weight"], student.state_dict()["lm_head.weight"])
    other = tiny(init=0.2)
    lm_distill(copy.deepcopy(other), other, tokens, LMKDConfig(kd_steps=1, kd_batch=2), seq_len=T)
    assert all(p.requires_grad for p in other.parameters())


def test_candidates_list_the_widths_they_change():
    rep = prune_to_params(tiny("qwen2"), ids(), 0.7, shapes=["mlp+kv", "depth+mlp"], tolerance=0.02)
    by = {c["name"]: c["widths"] for c in rep["candidates"]}
    assert by["mlp+kv"]["num_key_value_heads"] == [4, 2] and by["mlp+kv"]["intermediate_size"][0] == 64
    assert by["depth+mlp"]["num_hidden_layers"] == [4, 3] and "num_key_value_heads" not in by["depth+mlp"]
