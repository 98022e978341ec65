"""``prunekit graph``: draw a model's layers and pruning groups (Graphviz dot; SVG/PNG/PDF when ``dot`` exists).

Example::

    prunekit graph --model resnet20 --out resnet20.svg
    prunekit graph --from runs/base --preset interior --out groups.dot
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, field_validator

from prunekit import runs
from prunekit.cli.args import command
from prunekit.config import Config
from prunekit.errors import ConfigError
from prunekit.pruning.structured.draw import to_dot, write_drawing
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.settings import StructuredConfig

log = logging.getLogger("prunekit.graph")


class GraphConfig(Config):
    """``prunekit graph``: draw layers and pruning groups."""

    model: str | None = Field(None, description="model name (built-in, tv:NAME, timm:NAME, hf:NAME); or use --from")
    from_dir: Path | None = Field(None, alias="from", description="run directory whose model to draw")
    out: Path = Field(Path("graph.svg"), description="output file: .dot, .svg, .png or .pdf")
    in_channels: int = Field(3, ge=1, description="input channels for --model")
    num_classes: int = Field(10, ge=1, description="classifier outputs for --model")
    preset: str | None = Field(None, description="show the groups of this preset (mlp-only, interior)")
    only: list[str] = Field(default_factory=list, description="regexes of module names: show only these groups")
    ignore: list[str] = Field(default_factory=list, description="regexes of module names never pruned")
    heads: bool = Field(False, description="show attention heads as prunable groups")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        from prunekit.models import check_model_name

        return v if v is None else check_model_name(v)


def draw(cfg: GraphConfig) -> Path:
    """Write the drawing for ``cfg`` and return its path."""
    if (cfg.model is None) == (cfg.from_dir is None):
        raise ConfigError("give exactly one of --model NAME or --from DIR")
    if cfg.from_dir is not None:
        runs.check_run_dir(cfg.from_dir)
        model = runs.load_model(cfg.from_dir)
        title = f"{model.prunekit_spec.name} ({cfg.from_dir})"
    else:
        from prunekit.models import create_model

        model = create_model(cfg.model, in_channels=cfg.in_channels, num_classes=cfg.num_classes)
        title = cfg.model
    model.eval()
    x = runs.example_inputs(model.prunekit_spec, 1)
    graph = PruningGraph(model, x)
    settings = StructuredConfig.build({"preset": cfg.preset, "only": cfg.only, "ignore": cfg.ignore,
                                       "heads": cfg.heads})
    units = plan_units(graph, settings)
    out = write_drawing(to_dot(graph, units, title), cfg.out)
    log.info("graph: %d layers, %d prunable groups -> %s", len(graph.layers), len(units), out)
    return out


@command("graph", GraphConfig, help="Draw a model's layers and pruning groups (Graphviz)")
def graph_cmd(cfg: GraphConfig) -> None:
    print(f"wrote {draw(cfg)}")
