"""Every recipe in configs/ and the embedded demo recipe loads and validates (without training); recipe errors name
the stage and the key; a recipe runs end to end and resumes without redoing finished stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunekit import runs
from prunekit.errors import ConfigError
from prunekit.pipeline.recipe import DEMO_RECIPE, load_recipe, run_recipe, stage_configs

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_has_the_seed_recipes():
    names = {p.stem for p in CONFIGS}
    assert {"deit_tiny_vbp", "convnext_tiny_vbp", "vit_base_vbp", "deit_tiny_pat", "deit_tiny_3phase",
            "resnet50_imagenet_vbp", "mobilenetv2_imagenet_vbp", "resnet18_cifar10"} <= names


# Every value the seeds give for their reproductions (issue 5's list, from the VBP paper's settings): the recipe's
# resolved stage configs must carry exactly these.
KD = {"kd": True, "alpha": 0.7, "temperature": 2.0}
VBP_MLP = {"criterion": "variance", "scope": "global", "preset": "mlp-only", "compensate": "mean"}
ADAMW = {"optimizer": "adamw", "lr": 1.5e-5}
SEED_VALUES = {
    "deit_tiny_vbp": {"data": {"dataset": "imagenet", "batch_size": 64},
                      "prune": {**VBP_MLP, "ratio": 0.35, "keep_yaml": 0.65},
                      "finetune": {"epochs": 10, **ADAMW, **KD}},
    "convnext_tiny_vbp": {"prune": {**VBP_MLP, "ratio": 0.30, "keep_yaml": 0.70}, "finetune": KD},
    "vit_base_vbp": {"prune": {**VBP_MLP, "ratio": 0.35, "keep_yaml": 0.65}, "finetune": KD},
    "deit_tiny_pat": {"pat": {**VBP_MLP, "ratio": 0.35, "keep_yaml": 0.65, "steps": 5, "epochs": 1, **KD},
                      "finetune": {"epochs": 5, **KD}},
    "deit_tiny_3phase": {"sparse": {"method": "variance_concentration", "epochs": 5},
                         "pat": {**VBP_MLP, "ratio": 0.35, "keep_yaml": 0.65, "steps": 5, "epochs": 1},
                         "finetune": {"epochs": 5, **KD}},
}


@pytest.mark.parametrize("name", sorted(SEED_VALUES))
def test_seed_recipes_carry_the_seeds_values(name):
    import yaml

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    recipe = load_recipe(path)
    cfgs = stage_configs(recipe)
    for stage, want in SEED_VALUES[name].items():
        if stage == "data":
            assert {k: raw["data"][k] for k in want} == want
            continue
        want = dict(want)
        keep = want.pop("keep_yaml", None)
        if keep is not None:  # the recipe says keep, as the paper does; the stage runs at ratio = 1 - keep
            assert raw["stages"][stage]["keep"] == keep and "ratio" not in raw["stages"][stage]
        got = {k: cfgs[stage].flat()[k] for k in want}
        assert got == pytest.approx(want), (name, stage)


def test_resnet18_cifar10_recipe_cuts_at_least_40_percent_of_the_macs():
    cfgs = stage_configs(load_recipe(Path(__file__).parents[1] / "configs" / "resnet18_cifar10.yaml"))
    assert cfgs["prune"].prune.target.macs <= 0.6 and cfgs["finetune"].kd


def test_keep_is_ratio_spelled_as_kept_fraction():
    from prunekit.pruning.structured import PruneSettings

    assert PruneSettings.build({"keep": 0.65}).target.ratio == pytest.approx(0.35)
    assert PruneSettings.build({"keep": 0.65}).target.keep is None  # one stored value: ratio
    assert PruneSettings.build({"keep": 0.7, "ratio": 0.3}).target.ratio == pytest.approx(0.3)
    assert PruneSettings.build({"keep": "0.6"}, source="command line").target.ratio == pytest.approx(0.4)  # CLI strings
    with pytest.raises(ConfigError, match=r"`keep` = 'abc' is invalid"):
        PruneSettings.build({"keep": "abc"})
    with pytest.raises(ConfigError, match=r"both `keep` \(0.6\) and `target_macs` \(0.5\)"):
        PruneSettings.build({"keep": 0.6, "target_macs": 0.5})
    with pytest.raises(ConfigError, match=r"`keep` \(0.6\) and `ratio` \(0.5\) disagree"):
        PruneSettings.build({"keep": 0.6, "ratio": 0.5})
    with pytest.raises(ConfigError, match=r"`keep` = 1.5 is invalid.*\(0, 1\)"):
        PruneSettings.build({"keep": 1.5})
    import torch

    import prunekit

    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10)
    report = prunekit.prune(model, torch.randn(1, 1, 8, 8), "l1", keep=0.75, recalibrate_bn=False)
    assert report.ratio == pytest.approx(0.25)


@pytest.mark.parametrize("path", [*CONFIGS, DEMO_RECIPE], ids=lambda p: p.stem)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    cfgs = stage_configs(recipe)
    assert list(cfgs) == list(recipe.stages)
    first = next(iter(cfgs.values()))
    assert "from" not in type(first).keys() or first.from_dir is not None


def test_unknown_stage_key_names_stage_and_suggests(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  baseline: {model: smallcnn, epocs: 1}\n")
    with pytest.raises(ConfigError, match=r"stages.baseline.*unknown key 'epocs'; did you mean 'epochs'"):
        load_recipe(p)


def test_unknown_stage_lists_valid_stages(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  baseline: {model: smallcnn}\n  prnue: {}\n")
    with pytest.raises(ConfigError, match=r"unknown stage 'prnue'; did you mean 'prune'"):
        load_recipe(p)


def test_recipe_runs_and_resume_skips_finished_stages(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(f"out: {tmp_path / 'out'}\nstages:\n  baseline: {{model: smallcnn, epochs: 1, lr: 0.05}}\n"
                 "  prune: {criterion: l1, ratio: 0.4}\n  finetune: {epochs: 1, lr: 0.01}\n")
    recipe = load_recipe(p)
    res = run_recipe(recipe)
    base, ft = tmp_path / "out" / "1-baseline", tmp_path / "out" / "3-finetune"
    assert runs.RUN_FILES <= {f.name for f in base.iterdir()} and (tmp_path / "out" / "recipe.yaml").is_file()
    assert res["finetune"]["macs"] < res["baseline"]["macs"]
    assert runs.read_metrics(ft)["from"] == str(tmp_path / "out" / "2-prune")
    stamp = (base / runs.WEIGHTS).stat().st_mtime_ns
    with pytest.raises(ConfigError, match="--resume"):
        run_recipe(recipe)
    res2 = run_recipe(recipe, resume=True)
    assert (base / runs.WEIGHTS).stat().st_mtime_ns == stamp  # not redone
    assert res2["finetune"]["top1"] == pytest.approx(res["finetune"]["top1"])


def test_run_command_ends_with_the_report_of_its_runs(tmp_path, capsys):
    from prunekit.cli.main import main

    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  baseline: {model: smallcnn, epochs: 1, lr: 0.05}\n"
                 "  prune: {criterion: l1, ratio: 0.4}\n  eval: {}\n")
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    html = tmp_path / "out" / "report" / "report.html"
    assert f"report: {html}" in printed and html.is_file()
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    pruned = runs.read_metrics(tmp_path / "out" / "2-prune")
    assert "2-prune" in md and f"{pruned['top1']:.2f}" in md  # the pruned run's own figure, from metrics.json


def test_structured_then_2to4_inside_a_recipe(tmp_path):
    from prunekit.pruning.unstructured.patterns import nm_violations

    p = tmp_path / "r.yaml"
    p.write_text(f"out: {tmp_path / 'out'}\nstages:\n  baseline: {{model: smallcnn, epochs: 1, lr: 0.05}}\n"
                 "  prune: {criterion: l1, ratio: 0.25, round_to: 4}\n  sparsify: {method: nm, nm: '2:4'}\n")
    res = run_recipe(load_recipe(p))
    model = runs.load_model(tmp_path / "out" / "3-sparsify")  # masks re-attached from the run dir
    assert res["sparsify"]["macs"] == res["prune"]["macs"] < res["baseline"]["macs"]
    sparse = [m for m in model.modules() if hasattr(m, "weight_mask")]
    assert sparse and all(nm_violations(m.weight, 2, 4) == 0 for m in sparse)
    assert res["sparsify"]["sparsity"] == pytest.approx(0.5)


def test_overrides_accept_the_short_stage_form(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  baseline: {model: smallcnn, epochs: 1}\n  prune: {criterion: l1, ratio: 0.4}\n")
    short = load_recipe(p, {"prune.criterion": "l2", "stages.prune.ratio": 0.3, "seed": 3})
    assert short.stages["prune"] == {"criterion": "l2", "ratio": 0.3} and short.seed == 3
    with pytest.raises(ConfigError, match="criterion"):
        load_recipe(p, {"prune.criterion": "l7"})


def test_a_bad_override_is_blamed_on_set_and_a_data_typo_is_not_dropped(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  baseline: {model: smallcnn, epochs: 1}\n  prune: {criterion: l1, ratio: 0.4}\n")
    for key, said in (("sed", r"--set sed: unknown recipe key 'sed'; did you mean 'seed'"),
                      ("stages.prnue.ratio", r"--set stages.prnue.ratio: unknown stage 'prnue'; did you mean 'prune'"),
                      ("prune.ratoi", r"--set prune.ratoi: unknown prune option 'ratoi'; did you mean 'ratio'"),
                      ("data.batchsize", r"--set data.batchsize: unknown data option 'batchsize'; did you mean "
                                         r"'batch_size'")):
        with pytest.raises(ConfigError, match=said) as e:
            load_recipe(p, {key: 1})
        assert str(p) not in str(e.value)  # the file is fine
    p.write_text("data: {batchsize: 32}\nstages:\n  baseline: {model: smallcnn, epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"recipe data: unknown data option 'batchsize'; did you mean 'batch_size'"):
        load_recipe(p)
