"""``prunekit models`` and ``prunekit datasets``: what the registries hold."""

from __future__ import annotations

from pydantic import Field

from prunekit.cli.args import command
from prunekit.config import Config


class ListConfig(Config):
    pattern: str | None = Field(None, description="only names containing this text")


@command("models", ListConfig, help="List the built-in models (tv:, timm: and hf: names are open-ended)")
def models_cmd(cfg: ListConfig) -> None:
    from prunekit.models import list_models

    for name in list_models():
        if not cfg.pattern or cfg.pattern in name:
            print(name)
    print("also: tv:<torchvision name>, timm:<timm name>, hf:<hub name or local path>")


@command("datasets", ListConfig, help="List the datasets")
def datasets_cmd(cfg: ListConfig) -> None:
    from prunekit.data import dataset_info, list_datasets

    for name in list_datasets():
        if not cfg.pattern or cfg.pattern in name:
            i = dataset_info(name)
            print(f"{name:15s} classes {i.num_classes or '?':>4}  channels {i.in_channels}  size {i.image_size}")
