"""``prunekit models`` and ``prunekit datasets``: what the registries hold, what each is, its input, and whether it
works offline."""

from __future__ import annotations

from pydantic import Field

from prunekit.cli.args import command
from prunekit.config import Config

BUILTIN_INPUT = "C x H x W, H, W >= 8 (built for 32)"
# the open-ended sources: (name, description, input, offline)
SOURCES = (
    ("tv:<name>", "any torchvision classification model", "3 x 224 x 224 (most take others)",
     "yes; --pretrained downloads"),
    ("timm:<name>", "any timm model (extra: vision)", "the model's (ViT: --model-kwargs img_size=N)",
     "yes; --pretrained downloads"),
    ("hf:<name-or-path>", "Hugging Face image classifiers, BERT-style encoders (extra: hf)", "the model's",
     "a local folder: yes; a hub name downloads"),
)


class ListConfig(Config):
    pattern: str | None = Field(None, description="only names containing this text")


def _rows(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@command("models", ListConfig, help="List the models: the built-in ones, then tv:, timm: and hf: (open-ended)")
def models_cmd(cfg: ListConfig) -> None:
    from prunekit.models import MODELS, list_models

    rows = [(name, MODELS.meta(name).get("description", ""), BUILTIN_INPUT, "yes") for name in list_models()]
    rows += list(SOURCES)
    _rows([r for r in rows if not cfg.pattern or cfg.pattern in r[0]], ("name", "description", "input", "offline"))
    print("built-in models: --in-channels sets C, --num-classes the outputs; all start from random weights")


@command("datasets", ListConfig, help="List the datasets: description, size, classes and whether each works offline")
def datasets_cmd(cfg: ListConfig) -> None:
    from prunekit.data import dataset_info, list_datasets

    rows = []
    for name in list_datasets():
        if not cfg.pattern or cfg.pattern in name:
            i = dataset_info(name)
            rows.append((name, i.description, f"{i.in_channels} x {i.image_size} x {i.image_size}",
                         str(i.num_classes or "from folders"), i.offline))
    _rows(rows, ("name", "description", "input", "classes", "offline"))
