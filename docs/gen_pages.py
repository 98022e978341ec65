"""Pages generated when the site is built (mkdocs-gen-files): the CLI reference from the command registry and the
configs, the changelog from CHANGELOG.md, and a placeholder for a linked page not written yet.

Run alone (``python docs/gen_pages.py``) it prints the CLI reference.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# pages other people write; the site links them, so a missing one gets a placeholder instead of a broken link
LINKED = {"defaults.md": "Default settings", "quantize.md": "Quantization",
          "benchmarks/llm-grid.md": "Decoder LMs across models and domains",
          "benchmarks/yolo.md": "YOLO pruned to half its MACs"}


def _type(field) -> str:
    tp = field.annotation
    if typing.get_origin(tp) is typing.Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(tp))
    text = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return text.replace("|", "or").replace("NoneType", "None")


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "-"
    value = field.default
    return "-" if value in (None, "", [], {}) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def command_page(name: str) -> str:
    """One command's section: what it does, its example, and one row per flag from its config."""
    from prunekit.config import flag_name
    from prunekit.pipeline.commands import COMMANDS

    cmd = COMMANDS.get(name)
    lines = [f"## `prunekit {name}`", "", cmd.help + ("." if not cmd.help.endswith(".") else ""), ""]
    if cmd.stage:
        lines += [f"Recipe stage: `{cmd.stage}`.", ""]
    if cmd.example:
        lines += ["```bash", cmd.example, "```", ""]
    lines += ["| flag | type | default | what it does |", "|---|---|---|---|"]
    for key, (_, field) in cmd.config.flat_fields().items():
        flag = key if key in cmd.positional else flag_name(key)
        lines.append(f"| `{flag}` | {_cell(_type(field))} | {_cell(_default(field))} | "
                     f"{_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def cli_reference() -> str:
    from prunekit.cli.main import build_parser
    from prunekit.pipeline.commands import COMMANDS

    parser: argparse.ArgumentParser = build_parser()  # registers every command
    head = ["# Command line", "",
            "Generated from the command registry and each command's config, so it lists exactly what "
            "`prunekit COMMAND --help` accepts. Every command also takes `--config FILE.yaml` (the same keys as the "
            "flags, with `_` for `-`; flags override the file) and `--debug` (full tracebacks).", "",
            f"`{parser.prog} --version` prints the installed version.", ""]
    return "\n".join(head) + "\n" + "\n".join(command_page(n) for n in COMMANDS.names())


def main() -> None:
    import mkdocs_gen_files

    with mkdocs_gen_files.open("reference/cli.md", "w") as f:
        f.write(cli_reference())
    with mkdocs_gen_files.open("changelog.md", "w") as f:
        f.write((ROOT / "CHANGELOG.md").read_text())
    for page, title in LINKED.items():
        if not (ROOT / "docs" / page).exists():
            with mkdocs_gen_files.open(page, "w") as f:
                f.write(f"# {title}\n\nThis page is being written.\n")


if __name__ == "__main__":
    print(cli_reference())
else:
    main()
