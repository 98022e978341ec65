"""Width pruning of decoder-only LMs (Llama, Mistral, Qwen2, GPT-2), done directly on the transformers modules.

Per decoder layer, the same number of units is removed from every layer (see "Uniform width" below):

- **MLP channels**: row ``j`` of ``gate_proj`` and ``up_proj`` (GPT-2: ``c_fc``) with column ``j`` of ``down_proj``
  (``c_proj``), scored by a criterion of :mod:`prunekit.pruning.llm.criteria` (``variance`` = VBP, ``magnitude``,
  ``wanda``, ``random``); ``down_proj`` is then compensated (``none``/``mean``/``lstsq``,
  :mod:`prunekit.pruning.llm.compensate`); the config's ``intermediate_size`` (``n_inner``) is updated.
- **GQA groups**: a key-value head with its ``num_attention_heads / num_key_value_heads`` query heads (rows of
  ``q/k/v_proj``, columns of ``o_proj``); the config's ``num_attention_heads``, ``num_key_value_heads`` and an explicit
  ``head_dim`` are updated, and ``o_proj`` is compensated like ``down_proj``.

Statistics come from calibration token ids through forward-pre hooks (:mod:`prunekit.pruning.llm.stats`).
``sequential=True`` (default) measures layer ``l`` on the model whose layers ``< l`` are already pruned and
compensated, so each compensation fits the inputs the pruned model really produces (one partial forward pass of the
calibration set per layer, stopped at that layer); ``False`` measures every layer once on the dense model.

Uniform width: ``AutoModelForCausalLM.from_pretrained`` of these families builds every layer from one
``intermediate_size`` and one head count, so a model with per-layer widths would not reload with plain transformers.
Which channels go is still chosen per layer by its own scores; only how many is shared. (A per-layer allocation
would need zero-padding back to the widest layer, which saves nothing, or a custom model class.)

No new bias by default: compensation folds into the weights (``lstsq`` without an intercept, the least-squares fit
of ``W x`` by ``W_K' x_K`` alone) or into a bias the layer already has (GPT-2's ``c_proj``), so a pruned Llama /
Mistral / Qwen2 keeps its config's ``attention_bias`` / ``mlp_bias`` and the architecture llama.cpp, vLLM and other
runtimes expect. What an intercept would have restored is recorded per layer (``intercept_lost``: the calibration
output mean left uncorrected, relative to the output RMS). ``add_bias=True`` switches ``mlp_bias`` /
``attention_bias`` on in a Llama config instead (zero biases on gate/up, q/k/v; ``mean`` compensation needs it);
Mistral and Qwen2 configs cannot express those biases. The config keys other than the widths are checked unchanged
(:mod:`prunekit.pruning.llm.layout`), and :func:`save_pruned` refuses a model its config cannot describe.
Hidden-size pruning (``hidden_ratio``: across every RMSNorm, the embeddings and the LM head, Llama / Mistral / Qwen2)
is :mod:`prunekit.pruning.llm.hidden`, run after the MLP and head pruning.

Example:
    >>> cfg = WidthSettings(mlp_ratio=0.5, criterion="variance", compensate="lstsq")
    >>> report = prune_width(model, calib_ids, cfg)       # calib_ids: (N, T) token ids; model changed in place
    >>> save_pruned(model, "out/")                         # AutoModelForCausalLM.from_pretrained("out/") reloads it
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.transaction import transactional

from .arch import Block, Family, ensure_bias, get_family, head_layout, keep_in, keep_out, out_features, weight_oi
from .carry import affordable, capture, forward_runs, layer_stats, with_kwargs
from .compensate import compensate
from .criteria import Unit, get_criterion, needs_stats
from .layout import WIDTH_KEYS, check_expressible, config_changes, config_snapshot
from .reconstruct import dense_targets
from .stats import calibration_batches, collect_inputs
from .width_passes import run_passes
from .width_plan import (  # noqa: F401
    AUTO_CRITERION,
    AUTO_RECONSTRUCT,
    WidthSettings,
    _check_settings,
    _kept_groups,
    _kept_kv,
    kept_count,
)

log = logging.getLogger(__name__)

def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside prunekit's ``HFModel`` wrapper (or the model itself)."""
    inner = getattr(model, "model", None)
    if type(model).__name__ == "HFModel" and isinstance(inner, nn.Module):
        return inner
    return model


def _modules(lm: nn.Module) -> dict[str, nn.Module]:
    return dict(lm.named_modules())


def _mlp_unit(mods: dict[str, nn.Module], b: Block, st: dict, seed: int, centered: bool, keep: int) -> Unit:
    n = out_features(mods[b.producers[0]])
    ar = torch.arange(n).view(n, 1)
    x = st.get(b.producers[0])
    return Unit([weight_oi(mods[p]) for p in b.producers], [ar] * len(b.producers), weight_oi(mods[b.consumer]),
                ar, [x] * len(b.producers), st.get(b.consumer), seed, centered, keep)


def _head_unit(mods: dict[str, nn.Module], b: Block, st: dict, config: Any, seed: int, centered: bool,
               keep: int) -> Unit:
    nq, nkv, hd = head_layout(config)
    r = nq // nkv
    q_rows = torch.arange(nq * hd).view(nkv, r * hd)  # group g owns query heads g*r .. g*r + r - 1
    kv_rows = torch.arange(nkv * hd).view(nkv, hd)
    a = b.attn
    x = st.get(a["q"])
    return Unit([weight_oi(mods[a[k]]) for k in "qkv"], [q_rows, kv_rows, kv_rows], weight_oi(mods[a["o"]]),
                q_rows, [x, x, x], st.get(a["o"]), seed, centered, keep)


def _keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending (ties: the lower index wins)."""
    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return order.sort().values


class _Pruner:
    def __init__(self, lm: nn.Module, fam: Family, cfg: WidthSettings, batches: list[torch.Tensor]):
        self.lm, self.fam, self.cfg, self.batches = lm, fam, cfg, batches
        self.crit = {part: get_criterion(cfg.criterion_for(part)) for part in ("mlp", "heads")}
        self.records: list[dict[str, Any]] = []
        blocks = fam.blocks(lm)
        self.mlp_bias = cfg.mlp_ratio > 0 and self._bias_mode(fam.mlp_bias, [b.consumer for b in blocks], "down_proj")
        self.attn_bias = cfg.head_ratio > 0 and self._bias_mode(fam.attn_bias, [b.attn["o"] for b in blocks], "o_proj")
        self.biases_added: list[str] = []
        self.calibration_pass = "carried"
        self._dense: list[torch.Tensor] | None = None  # the dense model's input to the current layer (reconstruction)

    def _bias_mode(self, key: str | None, consumers: list[str], layer: str) -> bool:
        """Whether compensation may set a bias on the consumers: one they have, or one ``add_bias`` switches on."""
        mods = _modules(self.lm)
        if all(mods[c].bias is not None for c in consumers):
            return True  # an existing bias takes the intercept (GPT-2's c_proj, a Llama with mlp_bias)
        name = self.fam.name
        if self.cfg.add_bias and self.cfg.compensate != "none" and key is None:
            raise ConfigError(f"add_bias=True: a {name} config cannot express a bias on {layer}; use "
                              "add_bias=False (compensate='lstsq' folds into the weights)")
        if self.cfg.compensate == "mean" and not self.cfg.add_bias:
            how = (f"; add_bias=True (--add-bias) switches on {key} in its config (an architecture some runtimes "
                   "do not expect for this model type)" if key else "")
            raise PruningError(f"compensate='mean': this {name} model has no bias on {layer} and its config cannot "
                               f"express a bias there without changing the architecture{how}; or use "
                               "compensate='lstsq' (refits the weights, no bias) or 'none'")
        return self.cfg.add_bias and self.cfg.compensate != "none"

    def add_biases(self) -> None:
        """Switch on the biases ``add_bias`` asked for (config key + zeros), once every check has passed."""
        mods = _modules(self.lm)
        for on, key, what in ((self.mlp_bias, self.fam.mlp_bias, "mlp"), (self.attn_bias, self.fam.attn_bias, "attn")):
            if not on or key is None or getattr(self.lm.config, key, False):
                continue
            setattr(self.lm.config, key, True)  # the config turns biases on for every projection of that kind
            for b in self.fam.blocks(self.lm):
                for n in ([*b.producers, b.consumer] if what == "mlp" else list(b.attn.values())):
                    ensure_bias(mods[n])
            self.biases_added.append(key)
            log.info("%s switched on in the config (add_bias=True): zero biases except the compensated ones", key)

    def _stats(self, names: list[str], cov: list[str], stop: str | None) -> dict:
        return collect_inputs(self.lm, self.batches, names, covariance=cov, stop_after=stop) if names else {}

    def _needed(self, producer: str, consumer: str) -> tuple[list[str], list[str]]:
        part = "heads" if any(b.attn and b.attn["o"] == consumer for b in self.fam.blocks(self.lm)) else "mlp"
        need_x, need_h, need_cov = needs_stats(self.cfg.criterion_for(part))
        comp = self.cfg.compensate != "none"
        names = ([producer] if need_x else []) + ([consumer] if need_h or comp else [])
        return names, [consumer] if self.cfg.compensate == "lstsq" or need_cov else []

    def plan(self, blocks: list[Block]) -> dict[str, list[str]]:
        """Per block: the statistics points of heads then of the MLP."""
        out = {}
        for b in blocks:
            if self.cfg.head_ratio > 0:
                out[f"{b.prefix}:heads"] = self._needed(b.attn["q"], b.attn["o"])
            if self.cfg.kv_ratio > 0:
                out[f"{b.prefix}:kv"] = ([b.attn["q"]], [b.attn["q"]])
            if self.cfg.mlp_ratio > 0:
                out[f"{b.prefix}:mlp"] = self._needed(b.producers[0], b.consumer)
        return out

    def run(self, keep_mlp: int, keep_groups: int, keep_kv: int = 0) -> None:
        self.add_biases()
        blocks = self.fam.blocks(self.lm)
        layers = self.lm.get_submodule(self.fam.layers_path)
        carried = self._carried(layers)
        if carried is None:
            run_passes(self, blocks, layers, keep_mlp, keep_groups, keep_kv)
        else:
            runs, kws = carried
            for b in blocks:
                t0 = time.perf_counter()
                runs = self.prune_layer(layers[b.index], b, with_kwargs(runs, kws[b.index]), keep_mlp, keep_groups,
                                        keep_kv, reconstruct=self.cfg.reconstruct() > 0)
                log.info("layer %d/%d pruned (%.1f s)", b.index + 1, len(blocks), time.perf_counter() - t0)
        self.set_config(keep_mlp, keep_groups, keep_kv)

    def _carried(self, layers: nn.Module) -> tuple[list, list] | None:
        """Layer 0's inputs and every layer's arguments, for the layer-by-layer pass (:mod:`.carry`); ``None``
        where partial forward passes are used instead (``sequential=False``, too many tokens, an unusual model)."""
        copies = 3 if self.cfg.reconstruct() > 0 else 1  # with reconstruction: + targets, + previous
        if not self.cfg.sequential or not affordable(self.lm, self.batches, copies):
            self.calibration_pass = "dense" if not self.cfg.sequential else "partial forwards (memory)"
            return None
        try:
            carried = capture(self.lm, layers, self.batches)
        except PruningError as e:
            log.info("%s: statistics from a partial forward pass per layer instead", e)
            self.calibration_pass = "partial forwards"
            return None
        self.calibration_pass = "carried"
        return carried

    def prune_layer(self, layer: nn.Module, b: Block, runs: list, keep_mlp: int, keep_groups: int, keep_kv: int = 0,
                    reconstruct: bool = False) -> list:
        """Heads, key-value heads, then MLP of one layer, each on statistics of this layer's inputs ``runs``; with
        ``reconstruct`` the layer is then fitted to its dense output. Returns the next layer's inputs."""
        targets = dense_targets(layer, self._dense or [h for h, _ in runs], runs) if reconstruct else None
        if self.cfg.head_ratio > 0:
            nq, nkv, hd = head_layout(self.lm.config)
            names, cov = self._needed(b.attn["q"], b.attn["o"])
            self._prune_heads(b, layer_stats(self.lm, layer, runs, names, cov), keep_groups, nq, nkv, hd)
        if self.cfg.kv_ratio > 0:
            q = [b.attn["q"]]
            self.merge_kv(b, layer_stats(self.lm, layer, runs, q, q), keep_kv)
        if self.cfg.mlp_ratio > 0:
            names, cov = self._needed(b.producers[0], b.consumer)
            self._prune_mlp(b, layer_stats(self.lm, layer, runs, names, cov), keep_mlp)
        if targets is not None:
            self.reconstruct(layer, runs, targets, b)
            self._dense = targets  # the dense model's input to the next layer
        return forward_runs(layer, runs)

    def set_config(self, keep_mlp: int, keep_groups: int, keep_kv: int = 0) -> None:
        """Write the pruned widths into the config (once every layer is pruned)."""
        config = self.lm.config
        if self.cfg.mlp_ratio > 0:
            self.fam.set_width(config, keep_mlp)
        if self.cfg.head_ratio > 0:
            nq, nkv, hd = head_layout(config)
            config.head_dim = hd
            config.num_key_value_heads = keep_groups
            config.num_attention_heads = keep_groups * (nq // nkv)
        if self.cfg.kv_ratio > 0:
            config.head_dim = head_layout(config)[2]
            config.num_key_value_heads = keep_kv

    def reconstruct(self, layer: nn.Module, runs: list, targets: list[torch.Tensor], b: Block) -> None:
        from .reconstruct import fit_layer

        rec = fit_layer(layer, runs, targets, self.cfg.reconstruct(), self.cfg.reconstruct_lr, b.prefix)
        self.records.append({"layer": b.index, "part": "reconstruct", **rec})

    def merge_kv(self, b: Block, st: dict, keep_kv: int) -> None:
        """Merge this layer's key-value heads into ``keep_kv`` (:mod:`prunekit.pruning.llm.kv_merge`)."""
        from .kv_merge import merge_kv

        mods = _modules(self.lm)
        nq, nkv, hd = head_layout(self.lm.config)
        rec = merge_kv({k: mods[v] for k, v in b.attn.items()}, st[b.attn["q"]], nq, nkv, hd, keep_kv)
        attn = mods[b.attn["o"].rsplit(".", 1)[0]]
        for k, v in (("num_key_value_heads", keep_kv), ("num_key_value_groups", nq // keep_kv)):
            if hasattr(attn, k):
                setattr(attn, k, v)
        self.records.append({"layer": b.index, "part": "kv", "kept": keep_kv, "of": nkv, **rec})

    def _prune_mlp(self, b: Block, st: dict, keep_n: int) -> None:
        mods = _modules(self.lm)
        scores = self.crit["mlp"](_mlp_unit(mods, b, st, self.cfg.seed + b.index, self.mlp_bias, keep_n))
        keep = _keep(scores, keep_n)
        rec = compensate(mods[b.consumer], st.get(b.consumer), keep, self.cfg.compensate, bias=self.mlp_bias,
                         ridge=self.cfg.ridge, name=b.consumer)
        for p in b.producers:
            keep_out(mods[p], keep)
        keep_in(mods[b.consumer], keep)
        mlp = mods[b.consumer.rsplit(".", 1)[0]]
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_n
        self.records.append({"layer": b.index, "part": "mlp", "kept": keep_n, "of": len(scores), **rec})

    def _prune_heads(self, b: Block, st: dict, keep_g: int, nq: int, nkv: int, hd: int) -> None:
        mods = _modules(self.lm)
        unit = _head_unit(mods, b, st, self.lm.config, self.cfg.seed + 1000 + b.index, self.attn_bias, keep_g)
        groups = _keep(self.crit["heads"](unit), keep_g)
        q_keep = unit.members[0][groups].flatten()
        kv_keep = unit.members[1][groups].flatten()
        rec = compensate(mods[b.attn["o"]], st.get(b.attn["o"]), q_keep, self.cfg.compensate, bias=self.attn_bias,
                         ridge=self.cfg.ridge, name=b.attn["o"])
        keep_out(mods[b.attn["q"]], q_keep)
        keep_out(mods[b.attn["k"]], kv_keep)
        keep_out(mods[b.attn["v"]], kv_keep)
        keep_in(mods[b.attn["o"]], q_keep)
        attn = mods[b.attn["o"].rsplit(".", 1)[0]]
        for k, v in (("num_heads", keep_g * (nq // nkv)), ("num_key_value_heads", keep_g)):
            if hasattr(attn, k):
                setattr(attn, k, v)
        self.records.append({"layer": b.index, "part": "heads", "kept": keep_g, "of": nkv,
                             "groups": groups.tolist(), **rec})


@transactional("prune_width()")
def prune_width(model: nn.Module, calib: torch.Tensor | list[torch.Tensor], settings: WidthSettings | None = None,
                *, batch_size: int = 8, **overrides: Any) -> dict[str, Any]:
    """Prune ``model`` (a transformers causal LM or prunekit ``HFModel``) in place; returns a report.

    Args:
        model: LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel (or ``hf:`` wrapper).
        calib: calibration token ids, a ``(N, T)`` tensor or a list of ``(B, T)`` batches (from training text).
        settings: :class:`WidthSettings`; keyword ``overrides`` replace its fields.
        batch_size: batch size when ``calib`` is one tensor.

    Raises:
        ConfigError: bad settings (unknown criterion, heads on GPT-2, sparsity that keeps everything ...).
        PruningError: unsupported model, empty calibration data, compensation the config cannot express.
    """
    settings = WidthSettings.build({**(settings.to_dict() if settings else {}), **overrides}, "prune_width")
    lm = unwrap(model)
    fam = get_family(lm)
    config = lm.config
    _check_settings(settings, fam, config)
    blocks = fam.blocks(lm)
    inter = out_features(_modules(lm)[blocks[0].producers[0]])
    keep_mlp = kept_count(inter, settings.mlp_ratio, settings.round_to)
    if settings.mlp_ratio > 0 and keep_mlp == inter:
        raise ConfigError(f"mlp_ratio={settings.mlp_ratio} keeps all {inter} MLP channels "
                          f"(round_to={settings.round_to}); raise it or lower round_to")
    nq, nkv, keep_groups = _kept_groups(settings, fam, config)
    keep_kv = _kept_kv(settings, config)
    batches = calibration_batches(calib, batch_size)
    before = config_snapshot(config)
    params_before = sum(p.numel() for p in lm.parameters())
    t0 = time.perf_counter()
    heads = (f"heads {nq} -> {nq // nkv * keep_groups} ({nkv} -> {keep_groups} key-value groups)" if keep_groups
             else f"key-value heads merged -> {keep_kv}" if keep_kv else "heads kept")
    log.info("width pruning %s: MLP %d -> %d, %s, %s, compensate %s, %d calibration tokens", config.model_type,
             inter, keep_mlp, heads, settings.criterion, settings.compensate, sum(b.numel() for b in batches))
    pruner = _Pruner(lm, fam, settings, batches)
    if settings.mlp_ratio > 0 or settings.head_ratio > 0 or settings.kv_ratio > 0:
        pruner.run(keep_mlp, keep_groups, keep_kv)
    hidden = None
    if settings.hidden_ratio > 0:
        from .hidden import prune_hidden

        crit = {"magnitude": "magnitude", "random": "random"}.get(settings.criterion, "activation")
        hidden = prune_hidden(lm, batches, keep=1.0 - settings.hidden_ratio, criterion=crit, seed=settings.seed)
    kw = getattr(model, "_prunekit_kwargs", None)
    if isinstance(kw, dict) and "hf_config" in kw:  # keep an hf: wrapper's rebuild spec in step
        from prunekit.models.hf import config_to_dict

        kw["hf_config"] = config_to_dict(config)
    changes = config_changes(before, config, WIDTH_KEYS | set(pruner.biases_added), "width pruning")
    kv_groups = [nkv or (head_layout(config)[1] if fam.attn else None), keep_groups or keep_kv or None]
    rep = _report(settings, lm, [inter, keep_mlp], kv_groups, params_before, batches, t0, pruner.records, hidden)
    return rep | {"config_changes": changes, "biases_added": pruner.biases_added,
                  "calibration_pass": pruner.calibration_pass,
                  "intercept_lost_max": max((r.get("intercept_lost", 0.0) for r in pruner.records), default=0.0)}


def _report(settings: WidthSettings, lm: nn.Module, inter: list[int], kv_groups: list[int | None],
            params_before: int, batches: list[torch.Tensor], t0: float, layers: list[dict[str, Any]],
            hidden: dict[str, Any] | None) -> dict[str, Any]:
    return {"settings": settings.to_dict(), "model_type": lm.config.model_type, "intermediate_size": inter,
            "kv_groups": kv_groups, "params_before": params_before,
            "params_after": sum(p.numel() for p in lm.parameters()), "calib_tokens": sum(b.numel() for b in batches),
            "seconds": time.perf_counter() - t0, "layers": layers,
            **({"hidden_size": hidden["hidden_size"], "hidden_criterion": hidden["criterion"],
                "rms_correction": hidden["rms_correction"]} if hidden else {})}


def save_pruned(model: nn.Module, out: str | Path, report: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` (safetensors + config.json) plus ``prune_report.json``; reload with
    ``AutoModelForCausalLM.from_pretrained(out)``. A model its config cannot describe (per-layer widths, biases on
    some layers only) is refused with the reason (``PruningError``) and nothing is written."""
    lm = unwrap(model)
    check_expressible(lm)  # before anything is written
    out = Path(out)
    lm.save_pretrained(out, safe_serialization=True)
    if report is not None:
        (out / "prune_report.json").write_text(json.dumps(report, indent=1))
    if not (out / "model.safetensors").exists() and not any(out.glob("*.safetensors")):
        raise PruningError(f"save_pruned: no safetensors file was written to {out}")
    return out
