"""Block-wise reconstruction after pruning (``reconstruct_steps``): it lowers the pruned model's error on data it was
not fitted on, never leaves a block worse than compensation did, finds its blocks, and refuses bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.pruning import prune
from prunekit.pruning.structured.reconstruct import _mask_of, blocks_of, reconstruct, token_noise
from prunekit.pruning.structured.report import GroupRecord


class Block(nn.Module):
    """Post-LN residual MLP block (BERT's FFN half): LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(d, h), nn.Linear(h, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class Stack(nn.Module):
    def __init__(self, d_in: int = 12, d: int = 16, h: int = 48, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[Block(d, h) for _ in range(depth)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def data(seed: int, n: int, batch: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 12, generator=torch.Generator().manual_seed(99))  # the same low-rank structure everywhere
    x = torch.randn(n, 6, generator=g) @ mix + 0.1 * torch.randn(n, 12, generator=g)
    return list(x.split(batch))


def pruned(steps: int, lr: float = 0.01, **kw) -> tuple[nn.Module, nn.Module, object]:
    torch.manual_seed(0)
    dense = Stack().eval()
    model = copy.deepcopy(dense)
    report = prune(model, torch.randn(2, 12), "variance", ratio=0.6, scope="local", only=[r"blocks\.\d+\.fc1"],
                   calib_data=data(1, 1024), compensate="lstsq", calib_batches=16, reconstruct_steps=steps,
                   reconstruct_lr=lr, **kw)
    return dense, model, report


@torch.no_grad()
def error(dense: nn.Module, model: nn.Module) -> float:
    x = torch.cat(data(2, 512))  # held out: another draw than the calibration batches
    return float((model(x) - dense(x)).square().mean() / dense(x).square().mean())


def test_reconstruction_lowers_held_out_error_and_reports_every_block():
    dense, compensated, r0 = pruned(0)
    _, rebuilt, report = pruned(300)
    assert r0.reconstruction == []
    assert [r["block"] for r in report.reconstruction] == ["blocks.0", "blocks.1", "blocks.2"]
    for rec in report.reconstruction:
        assert rec["layers"] == sorted([f"{rec['block']}.fc1", f"{rec['block']}.fc2"])
        assert rec["loss_after"] <= rec["loss_before"]
    assert all(r["kept"] == "reconstructed" for r in report.reconstruction)
    before, after = error(dense, compensated), error(dense, rebuilt)
    assert after < 0.8 * before, (before, after)
    assert "reconstructed 3 of 3 blocks" in report.summary()
    # only the pruned layers move: the LayerNorms and the embedding keep the compensated model's weights
    for name in ("embed.weight", "blocks.1.norm.weight", "head.bias"):
        assert torch.equal(rebuilt.state_dict()[name], compensated.state_dict()[name])
    assert not torch.equal(rebuilt.blocks[1].fc1.weight, compensated.blocks[1].fc1.weight)
    assert all(p.requires_grad for p in rebuilt.parameters())  # the flags are restored


def test_a_diverging_reconstruction_keeps_the_compensated_weights():
    _, compensated, _ = pruned(0)
    _, model, report = pruned(20, lr=1e4)  # steps thousands of times the weights' size: the held-out error explodes
    assert [r["kept"] for r in report.reconstruction] == ["compensated"] * 3
    for (n, a), b in zip(model.state_dict().items(), compensated.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_block_whose_output_lost_channels_is_skipped_loudly(caplog):
    torch.manual_seed(0)
    model = Stack().eval()
    report = prune(model, torch.randn(2, 12), "variance", ratio=0.5, scope="local", calib_data=data(1, 256),
                   compensate="mean", reconstruct_steps=5)  # no preset: the residual stream is pruned too
    assert report.reconstruction and all(r["kept"] == "skipped: output pruned" for r in report.reconstruction)
    assert "lost channels of the dense one" in caplog.text


def test_reconstruction_needs_calibration_data_and_a_known_train_choice():
    with pytest.raises(ConfigError, match="reconstruct_steps=5 needs calibration data"):
        prune(Stack(), torch.randn(2, 12), "l1", ratio=0.5, reconstruct_steps=5)
    with pytest.raises(ConfigError, match="train='all'.*'pruned'.*'block'"):
        reconstruct(Stack(), Stack(), data(1, 128), {"blocks.0": ["blocks.0.fc1"]}, train="all")


def test_blocks_are_the_innermost_module_holding_a_group():
    model = Stack()
    groups = [GroupRecord("blocks.0.fc1", ["blocks.0.fc1"], ["blocks.0.fc2"], 48, 24),
              GroupRecord("blocks.2.fc1", ["blocks.2.fc1"], ["blocks.2.fc2"], 48, 24),
              GroupRecord("embed", ["embed"], ["blocks.0.fc1", "blocks.1.fc1", "head"], 16, 8)]  # meets at the root
    assert blocks_of(model, groups) == {"blocks.0": ["blocks.0.fc1", "blocks.0.fc2"],
                                        "blocks.2": ["blocks.2.fc1", "blocks.2.fc2"]}
    # a group inside an already chosen block joins it; one spanning two blocks makes their parent the block
    groups.append(GroupRecord("blocks.0.fc2", ["blocks.0.fc2"], ["blocks.1.fc1"], 16, 8))
    assert blocks_of(model, groups) == {"blocks": ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1",
                                                   "blocks.2.fc1", "blocks.2.fc2"]}


def test_a_group_inside_a_sub_module_takes_the_repeated_block_around_it():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    class ViTBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mlp = nn.LayerNorm(8), Mlp()

    model = nn.Module()
    model.blocks = nn.ModuleList([ViTBlock(), ViTBlock()])
    g = GroupRecord("blocks.1.mlp.fc1", ["blocks.1.mlp.fc1"], ["blocks.1.mlp.fc2"], 16, 8)
    assert blocks_of(model, [g]) == {"blocks.1": ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]}


def test_padding_positions_are_left_out_of_the_loss():
    out = torch.zeros(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(_mask_of({"input_ids": mask, "attention_mask": mask}, out), mask.bool())
    assert _mask_of({"attention_mask": mask}, torch.zeros(2, 3)) is None  # not a (batch, sequence) output
    assert _mask_of(torch.zeros(2, 5), out) is None


class Encoder(nn.Module):
    """A tiny random HF BERT returning its last hidden state (what a sentence embedder pools)."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        self.bert = transformers.AutoModel.from_config(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=60,
            max_position_embeddings=32))

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def token_batches(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 60, (8, 12), generator=g)
        lengths = torch.randint(4, 13, (8,), generator=g)
        mask = (torch.arange(12)[None] < lengths[:, None]).long()  # right padding, as a tokenizer pads
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def test_hf_bert_layers_are_reconstructed_with_padding_masked():
    torch.manual_seed(0)
    dense = Encoder().eval()
    calib, held = token_batches(1, 16), token_batches(2, 8)

    def run(steps: int):
        model = copy.deepcopy(dense)
        rep = prune(model, {k: v[:2] for k, v in calib[0].items()}, "variance", ratio=0.6, preset="mlp-only",
                    scope="local", calib_data=calib, compensate="lstsq", calib_batches=16, reconstruct_steps=steps)
        with torch.no_grad():
            err = sum(float((model(**b) - dense(**b))[b["attention_mask"].bool()].square().mean()) for b in held)
        return rep, err

    _, before = run(0)
    rep, after = run(150)
    assert [r["block"] for r in rep.reconstruction] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert all(r["kept"] == "reconstructed" for r in rep.reconstruction)
    assert after < 0.95 * before, (before, after)


def test_batchnorm_statistics_are_not_touched_even_for_a_model_in_training_mode():
    def run(steps: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).train()
        g = torch.Generator().manual_seed(5)
        batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(4)]
        rep = prune(model, torch.randn(1, 3, 8, 8), "variance", ratio=0.5, calib_data=batches, compensate="mean",
                    ignore=[r"0\.3"], reconstruct_steps=steps)
        assert model.training and model[0][1].training  # the caller's modes are restored
        assert [r["block"] for r in rep.reconstruction] == (["0"] if steps else [])
        return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    plain, rebuilt = run(0), run(10)
    for k in plain:
        assert torch.equal(plain[k], rebuilt[k]), k


def test_train_block_fits_every_parameter_of_the_block_and_pruned_only_the_pruned_layers():
    dense, compensated, report = pruned(0)
    blocks = blocks_of(compensated, report.groups)
    fitted = {}
    for mode in ("pruned", "block"):
        model = copy.deepcopy(compensated)
        recs = reconstruct(model, dense, data(1, 1024), blocks, steps=60, train=mode)
        assert all(r["kept"] == "reconstructed" for r in recs)
        fitted[mode] = model
    for name in ("blocks.0.norm.weight", "blocks.2.norm.bias"):
        assert torch.equal(fitted["pruned"].state_dict()[name], compensated.state_dict()[name])
        assert not torch.equal(fitted["block"].state_dict()[name], compensated.state_dict()[name])
    assert torch.equal(fitted["block"].embed.weight, compensated.embed.weight)  # outside every block


def test_token_noise_replaces_inner_real_tokens_with_the_batch_own_tokens():
    batch = token_batches(3, 1)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    out = token_noise(0.5)(batch, torch.Generator().manual_seed(0))
    new = out["input_ids"]
    assert torch.equal(out["attention_mask"], batch["attention_mask"]) and torch.equal(ids, batch["input_ids"])
    last = mask.long().cumsum(1).argmax(1)
    rows = torch.arange(ids.shape[0])
    assert torch.equal(new[:, 0], ids[:, 0]) and torch.equal(new[rows, last], ids[rows, last])
    assert torch.equal(new[~mask], ids[~mask])  # padding untouched
    changed = new != ids
    inner = int(mask.sum()) - 2 * ids.shape[0]
    assert 0.2 * inner < int(changed.sum()) < 0.6 * inner
    assert set(new[changed].tolist()) <= set(ids[mask].tolist())  # drawn from the batch's own text
    with pytest.raises(ConfigError, match="token_noise"):
        token_noise(0.0)


def test_token_noise_keeps_the_first_real_token_of_left_padded_rows():
    ids = torch.tensor([[0, 0, 101, 7, 8, 9, 10, 102], [101, 5, 6, 7, 8, 9, 10, 102]])
    mask = (ids != 0).long()
    new = token_noise(0.9)({"input_ids": ids, "attention_mask": mask}, torch.Generator().manual_seed(1))["input_ids"]
    assert new[0, 2] == 101 and new[1, 0] == 101 and (new[:, -1] == 102).all() and (new[0, :2] == 0).all()
    assert (new != ids).any()


def test_augmented_copies_join_the_fit_but_not_the_held_out_batches():
    torch.manual_seed(0)
    dense = Encoder().eval()
    calib = token_batches(1, 8)
    model = copy.deepcopy(dense)
    rep = prune(model, {k: v[:2] for k, v in calib[0].items()}, "variance", ratio=0.6, preset="mlp-only",
                scope="local", calib_data=calib, compensate="lstsq", calib_batches=8)
    blocks = blocks_of(model, rep.groups)
    seen: list[torch.Tensor] = []
    noise = token_noise(0.3)

    def spy(batch, gen):
        seen.append(batch["input_ids"])
        return noise(batch, gen)

    plain = reconstruct(copy.deepcopy(model), dense, calib, blocks, steps=20)
    aug = reconstruct(copy.deepcopy(model), dense, calib, blocks, steps=20, augment=spy, augment_copies=2)
    assert [r["batches"] for r in plain] == [8, 8] and [r["batches"] for r in aug] == [8 + 2 * 7] * 2
    # every training batch (calib[1:]) was copied twice; the held-out one (calib[0], 8 // 8 = 1) never
    assert len(seen) == 14 and not any(torch.equal(x, calib[0]["input_ids"]) for x in seen)
    assert all(sum(torch.equal(x, b["input_ids"]) for x in seen) == 2 for b in calib[1:])
    # the first block's held-out error before fitting is measured on the same clean batch in both runs; the fit differs
    assert plain[0]["loss_before"] == aug[0]["loss_before"] and plain[0]["loss_after"] != aug[0]["loss_after"]
    with pytest.raises(ConfigError, match="augment_copies=2.*needs augment="):
        reconstruct(model, dense, calib, blocks, steps=5, augment_copies=2)
    with pytest.raises(ConfigError, match="augment_copies=0 would not augment"):
        reconstruct(model, dense, calib, blocks, steps=5, augment=noise)


def test_prune_reconstruct_augment_is_wired_and_refuses_what_it_cannot_do():
    torch.manual_seed(0)
    dense = Encoder().eval()
    calib = token_batches(1, 8)
    example = {k: v[:2] for k, v in calib[0].items()}
    rep = prune(copy.deepcopy(dense), example, "variance", ratio=0.6, preset="mlp-only", scope="local",
                calib_data=calib, compensate="lstsq", calib_batches=8, reconstruct_steps=10, reconstruct_augment=1)
    assert [r["batches"] for r in rep.reconstruction] == [8 + 7] * 2
    # scope="adaptive"'s trials prune without reconstruction (and so without its augmentation)
    rep = prune(copy.deepcopy(dense), example, "variance", ratio=0.6, preset="mlp-only", scope="adaptive",
                calib_data=calib, compensate="lstsq", calib_batches=8, reconstruct_steps=5, reconstruct_augment=1)
    assert [r["batches"] for r in rep.reconstruction] == [8 + 7] * 2
    with pytest.raises(ConfigError, match="reconstruct_augment=1.*reconstruct_steps=0"):
        prune(copy.deepcopy(dense), example, "variance", ratio=0.6, preset="mlp-only", calib_data=calib,
              reconstruct_augment=1)
    model = Stack()
    before = [p.shape for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"reconstruct_augment=1 perturbs token batches.*Tensor.*"
                                          r"reconstruct_augment=0 \(--reconstruct-augment 0\)"):
        prune(model, torch.randn(2, 12), "variance", ratio=0.5, only=[r"blocks\.\d+\.fc1"],
              calib_data=data(1, 256), compensate="mean", reconstruct_steps=5, reconstruct_augment=1)
    assert [p.shape for p in model.parameters()] == before  # refused before anything was pruned


def test_prune_reconstruct_train_block_is_wired_and_validated():
    _, pruned_only, rep_p = pruned(40)
    _, whole, rep_b = pruned(40, reconstruct_train="block")
    assert all(r["kept"] == "reconstructed" for r in rep_b.reconstruction)
    assert torch.equal(pruned_only.blocks[1].norm.weight, pruned_only.blocks[1].norm.weight.new_ones(16))
    assert not torch.equal(whole.blocks[1].norm.weight, pruned_only.blocks[1].norm.weight)  # the norm moved too
    with pytest.raises(ConfigError, match="reconstruct_train"):
        pruned(5, reconstruct_train="all")
    _, _, rep_m = pruned(40, reconstruct_input_mix=0.5)  # wired: blocks after the first fit differently
    assert rep_m.reconstruction[0]["loss_after"] == rep_p.reconstruction[0]["loss_after"]
    assert rep_m.reconstruction[2]["loss_after"] != rep_p.reconstruction[2]["loss_after"]
    with pytest.raises(ConfigError, match="reconstruct_input_mix"):
        pruned(5, reconstruct_input_mix=1.0)
    # either option without reconstruct_steps would silently do nothing: refused
    with pytest.raises(ConfigError, match="reconstruct_input_mix=0.5 shapes the reconstruction.*reconstruct_steps=0"):
        pruned(0, reconstruct_input_mix=0.5)
    with pytest.raises(ConfigError, match="reconstruct_train='block' shapes the reconstruction"):
        pruned(0, reconstruct_train="block")


def test_input_mix_feeds_dense_inputs_to_every_block_but_the_first_and_is_validated():
    dense, compensated, report = pruned(0)
    blocks = blocks_of(compensated, report.groups)
    recs = {}
    for mix in (0.0, 0.5):
        model = copy.deepcopy(compensated)
        recs[mix] = reconstruct(model, dense, data(1, 1024), blocks, steps=40, input_mix=mix)
        assert all(r["kept"] == "reconstructed" for r in recs[mix])
    # block 0's pruned and dense inputs are the same tensor: mixing changes nothing there; later blocks fit differently
    assert recs[0.0][0]["loss_after"] == recs[0.5][0]["loss_after"]
    assert recs[0.0][1]["loss_before"] == recs[0.5][1]["loss_before"] and \
        recs[0.0][1]["loss_after"] != recs[0.5][1]["loss_after"]
    with pytest.raises(ConfigError, match=r"input_mix=1.0\) must be in \[0, 1\)"):
        reconstruct(compensated, dense, data(1, 256), blocks, steps=5, input_mix=1.0)


def test_mix_takes_elements_from_both_inputs_and_leaves_other_leaves_alone():
    from prunekit.pruning.structured.reconstruct import _mix

    a, b = torch.zeros(200, 10), torch.ones(200, 10)
    ids = torch.arange(5)
    (x, y), kw = _mix(((a, ids), {"h": a, "flag": True}), ((b, ids + 1), {"h": b, "flag": False}), 0.3,
                      torch.Generator().manual_seed(0))
    assert 0.25 < float(x.mean()) < 0.35 and 0.25 < float(kw["h"].mean()) < 0.35
    assert torch.equal(y, ids) and kw["flag"] is True  # integer tensors and non-tensors stay the pruned model's
    assert torch.equal(_mix(a, torch.ones(3), 0.9, torch.Generator()), a)  # shapes differ: left alone
