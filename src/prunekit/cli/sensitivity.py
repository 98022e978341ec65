"""``prunekit sensitivity``: prints what ``prunekit.pipeline.sensitivity`` measured."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.pipeline.sensitivity import SensitivityConfig, sensitivity_run  # noqa: F401 (the old import path)


@prints("sensitivity")
def sensitivity_cmd(cfg: SensitivityConfig, result: tuple[dict[str, Any], Any]) -> None:
    from prunekit.report.sensitivity import most_sensitive

    res, out = result
    print(f"baseline top1 {res['baseline']['top1']:.2f}% on {res['samples']} samples; {len(res['groups'])} groups "
          f"in {res['seconds']:.0f}s")
    print("most sensitive (mean top-1 drop over the ratios): "
          + ", ".join(f"{name} {drop:.2f}" for name, drop in most_sensitive(res, 5)))
    print(f"wrote {out}/sensitivity.json, sensitivity.csv, sensitivity.png")
