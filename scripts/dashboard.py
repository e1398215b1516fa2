"""Create the standard W&B workspace of a q8 project (with the wandb-workspaces package).

    python scripts/dashboard.py ENTITY/PROJECT                  # create the saved view
    python scripts/dashboard.py ENTITY/PROJECT --dry-run        # print what it would create
    python scripts/dashboard.py ENTITY/PROJECT --from-run outputs/<run dir>   # + per-layer panels

Runs are grouped by quant preset (config `quant_name`), mean over seeds with the std shaded.
Sections: accuracy and loss; per-layer SQNR of W, x, g_l and the g_W copy; cos(g_W) against
fp32; gradient norms. Without credentials or a network it prints the plan instead.

--from-run reads the run with compare_runs.py, imported as a sibling module: Python searches a
script's own folder first, so `python scripts/dashboard.py` finds it from any directory. q8 is
the installed package (make setup: pip install -e .).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUP_KEY = "quant_name"  # set by conf/train.yaml from the chosen quant preset
STEP = "trainer/global_step"


@dataclass
class Panel:
    """A line or bar plot: its title and y keys, or a regex over keys (one line per match)."""

    title: str
    y: list[str] = field(default_factory=list)
    regex: str | None = None
    bar: bool = False
    log_y: bool = False

    def describe(self) -> str:
        what = f"regex {self.regex}" if self.regex else ", ".join(self.y)
        return f"{'bar' if self.bar else 'line'}: {self.title} [{what}]"


def plan(layers: list[str]) -> list[tuple[str, list[Panel]]]:
    """The sections and panels of the workspace; `layers` adds one SQNR panel per layer."""
    sections = [
        ("Accuracy and loss by preset", [
            Panel("final test accuracy", ["test/acc"], bar=True),
            Panel("validation accuracy", ["val/acc"]),
            Panel("training loss", ["train/loss_step"]),
            Panel("validation loss", ["val/loss"]),
            Panel("learning rate", ["train/lr"]),
        ]),
        ("Per-layer SQNR (dB)", [
            Panel(f"{what} SQNR, every layer", regex=f"quant/.*/{what}_sqnr_db")
            for what in ("weight", "act", "grad", "wgrad")
        ]),
        ("Weight gradient vs fp32", [
            Panel("cos(quantized dL/dW, fp32 dL/dW)", regex="quant/.*/wgrad_cosine"),
            Panel("values at the range ends, g_l", regex="quant/.*/grad_clip_frac"),
            Panel("activations outside the eval range", regex="quant/.*/act_eval_clip_frac"),
        ]),
        ("Gradient norms", [
            Panel("|dL/dW| per layer", regex="grads/.*/wgrad_norm", log_y=True),
            Panel("|g_l| per layer", regex="grads/.*/g_norm", log_y=True),
            Panel("zero fraction of g_l", regex="grads/.*/g_zero_frac"),
        ]),
    ]
    if layers:
        sections.append(("SQNR by layer", [
            Panel(layer, [f"quant/{layer}/{w}_sqnr_db" for w in ("weight", "act", "grad", "wgrad")])
            for layer in layers
        ]))
    return sections


def build_workspace(entity: str, project: str, name: str,
                    sections: list[tuple[str, list[Panel]]]) -> Any:
    """The wandb_workspaces.Workspace for `sections` (needs the wandb-workspaces package)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def panel(p: Panel) -> Any:
        group = {"groupby": GROUP_KEY, "groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}
        if p.bar:
            return wr.BarPlot(title=p.title, metrics=p.y, **group)
        if p.regex:  # one line per matching key: per-layer panels stay per run
            return wr.LinePlot(title=p.title, x=STEP, metric_regex=p.regex, log_y=p.log_y or None)
        return wr.LinePlot(title=p.title, x=STEP, y=p.y, log_y=p.log_y or None, **group)

    return ws.Workspace(
        entity=entity, project=project, name=name,
        sections=[ws.Section(name=title, panels=[panel(p) for p in panels], is_open=True)
                  for title, panels in sections],
        runset_settings=ws.RunsetSettings(groupby=[ws.Config(GROUP_KEY)]),
    )


def layers_of_run(run_dir: Path) -> list[str]:
    """Layer names in network order from a local run's per-layer SQNR keys."""
    from compare_runs import layer_names, load_local  # pandas: only for --from-run

    return layer_names(load_local(run_dir), "_sqnr_db")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("project", help="ENTITY/PROJECT")
    p.add_argument("--name", default="q8: presets, layers, gradients", help="the view's name")
    p.add_argument("--layers", nargs="*", default=[], help="layers to give their own panel")
    p.add_argument("--from-run", type=Path, help="take --layers from a local run directory")
    p.add_argument("--dry-run", action="store_true", help="print the plan, create nothing")
    args = p.parse_args(argv)
    if args.project.count("/") != 1:
        p.error("project must be ENTITY/PROJECT")
    entity, project = args.project.split("/")
    layers = list(args.layers) + (layers_of_run(args.from_run) if args.from_run else [])
    sections = plan(layers)

    print(f"workspace {args.name!r} for {entity}/{project}, runs grouped by config "
          f"{GROUP_KEY} (mean, std shaded), x = {STEP}")
    for title, panels in sections:
        print(f"  section {title}")
        for panel in panels:
            print(f"    {panel.describe()}")
    if args.dry_run:
        try:  # check the objects without saving them
            build_workspace(entity, project, args.name, sections)
            print("(dry run: the wandb-workspaces objects build; nothing created)")
        except ImportError:
            print("(dry run; wandb-workspaces is not installed: pip install wandb-workspaces)")
        return 0
    try:
        from q8.lit.loggers import wandb_has_credentials

        if not wandb_has_credentials():
            print("no W&B credentials (WANDB_API_KEY or `wandb login`): nothing created")
            return 1
        workspace = build_workspace(entity, project, args.name, sections).save()
    except ImportError as ex:
        print(f"cannot create it: {ex}; pip install wandb-workspaces", file=sys.stderr)
        return 1
    except Exception as ex:  # network, permissions: the plan above is what was meant
        print(f"cannot create it: {type(ex).__name__}: {ex}", file=sys.stderr)
        return 1
    print(f"created {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
