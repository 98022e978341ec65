"""Multi-process pruning (issue 5): two gloo ranks on CPU see different calibration batches, sync their statistics by
module name and prune the same channels; differing masks are an error; a whole recipe runs under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prunekit import runs
from prunekit.train.distributed import tensor_digest


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 3)).eval()


def _batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    scale = 1.0 + rank  # the ranks' data differ clearly, so unsynced statistics would rank channels differently
    return [scale * torch.randn(8, 1, 6, 6, generator=g) for _ in range(3)]


def _prune(model: nn.Module, batches: list[torch.Tensor], criterion: str, seed: int = 0) -> dict:
    from prunekit.pruning import prune

    extra = {}
    if criterion == "reconstruct":  # variance + mean, then the block "0" (both convs) reconstructed
        model = nn.Sequential(model[:6], *model[6:])
        criterion, extra = "variance", {"reconstruct_steps": 10, "ignore": [r"0\.3"]}
    report = prune(model, torch.randn(1, 1, 6, 6), criterion=criterion, ratio=0.5, calib_data=batches,
                   compensate="mean" if criterion == "variance" else "none", seed=seed, **extra)
    if extra:
        assert [r["block"] for r in report.reconstruction] == ["0"], report.reconstruction
        model = nn.Sequential(*model[0], *model[1:])  # the flat module order the callers index
    return {"kept": {g.name: g.after for g in report.groups},
            "removed": {g.name: g.removed for g in report.groups},
            "bias": model[3].bias.detach().double().tolist(),
            "digest": tensor_digest([p for p in model.state_dict().values()])}


def _worker(rank: int, world: int, init: str, out: str, criterion: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = _prune(_model(), _batches(rank), criterion, seed=rank)  # the seed only matters for "random"
        dist.barrier()  # gloo aborts a rank still finishing its last collective if its peer tears down first
    except Exception as e:  # noqa: BLE001 - reported to the parent
        res = {"error": f"{type(e).__name__}: {e}"}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def _spawn(tmp_path: Path, criterion: str) -> list[dict]:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(2, init, str(tmp_path), criterion), nprocs=2, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_sync_statistics_and_prune_the_same_channels(tmp_path):
    r0, r1 = _spawn(tmp_path, "variance")
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["removed"] == r1["removed"] and r0["digest"] == r1["digest"]
    # synced = what one process computes over both ranks' batches (statistics merged exactly, by module name)
    single = _prune(_model(), _batches(0) + _batches(1), "variance")
    assert single["removed"] == r0["removed"]
    torch.testing.assert_close(torch.tensor(r0["bias"]), torch.tensor(single["bias"]), rtol=1e-6, atol=1e-6)
    # and it is not what rank 0 alone would have chosen and compensated
    alone = _prune(_model(), _batches(0), "variance")
    assert alone["removed"] != r0["removed"] or alone["bias"] != r0["bias"]


def test_two_ranks_reconstruct_to_the_same_weights(tmp_path):
    r0, r1 = _spawn(tmp_path, "reconstruct")  # each rank fits on its own batches; the fits are averaged
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["removed"] == r1["removed"] and r0["digest"] == r1["digest"]
    alone = _prune(_model(), _batches(0), "reconstruct")
    assert alone["digest"] != r0["digest"]


def test_masks_that_differ_across_ranks_are_an_error_naming_the_group(tmp_path):
    r0, r1 = _spawn(tmp_path, "random")  # a different seed per rank: different masks
    for r in (r0, r1):
        assert "PruningError" in r.get("error", "") and "pruning masks differ across ranks" in r["error"]
        assert "first at '" in r["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_recipe_runs_under_torchrun_with_two_processes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""
        name: ddp
        data: {dataset: digits, batch_size: 64}
        stages:
          baseline: {model: smallcnn, epochs: 1, lr: 0.05}
          prune: {criterion: variance, ratio: 0.4, compensate: mean, calib_batches: 4}
          finetune: {epochs: 1, lr: 0.01, kd: true}
    """))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "prunekit", "run", str(recipe), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 0 of 2" in p.stdout + p.stderr
    stage_dirs = {d.name: d for d in out.iterdir() if d.is_dir()}
    ft = next(d for n, d in stage_dirs.items() if "finetune" in n)
    pruned = next(d for n, d in stage_dirs.items() if "prune" in n)
    base = next(d for n, d in stage_dirs.items() if "baseline" in n)
    runs.check_run_dir(ft)
    m = runs.read_metrics(ft)
    assert m["macs"] < runs.read_metrics(base)["macs"]
    assert 0 <= m["top1"] <= 100 and m["params"] == runs.read_metrics(pruned)["params"]
    assert [r["epoch"] for r in runs.read_history(ft)] == [1]  # one epoch, one history line (rank 0 alone wrote)
    model = runs.load_model(ft)  # written once, by rank 0, complete
    assert sum(p.numel() for p in model.parameters()) == m["params"]
