"""Everything the command line does, as functions. The CLI parses options, calls these, and prints.

    from ckptavg import api
    avg = api.Averaging(device="cpu")
    run = api.run_trajectory(api.open_trajectory("runs/my-run"), api.RunSpec("lawa", 5, 1000, 3000, 5000, 20000),
                             "out", avg)
    api.evaluate("out", api.scoring("heldout", "results.sqlite", ppl_task=["heldout=heldout.jsonl"]))

Settings are checked when they are made (`scoring`, `Averaging.checked`), so that a bad one fails
before anything is listed, fetched or written; pass them to the functions that do the work. One module
per job: `settings` (what a run is made with), `trajectories` (opening, running and following them),
`scores` (scoring, trackers, diversity), `tasks` (the tasks' data), `outputs` (interpolations, a finished
output's summary), `reports` (rows, savings, figures).
Averaging itself is `ckptavg.average_checkpoints` and `ckptavg.average_in_memory`. Importing this
module imports no torch: planning and dry runs run anywhere.
"""

from __future__ import annotations

from ..trajectory.catalogue import CatalogueTrajectory
from ..trajectory.events import Broadcast, Events
from ..trajectory.follow import FollowOptions
from ..trajectory.run import Job, RunPlan, RunSpec
from .outputs import interpolate, output_summary
from .reports import plot, result_rows, savings_table
from .scores import EvalRun, diversity, evaluate, export_scores, fetch_summary, find_targets
from .settings import Averaging, ByteBar, Scoring, resolve_device, scoring, torch_dtype
from .tasks import fetch_task_data, task_sources
from .trajectories import (
    TrajectoryRun,
    follow_trajectories,
    follow_trajectory,
    open_trajectory,
    pythia_trajectory,
    run_trajectory,
)

__all__ = [
    "Averaging", "Broadcast", "ByteBar", "CatalogueTrajectory", "EvalRun", "Events", "FollowOptions", "Job",
    "RunPlan", "RunSpec", "Scoring", "TrajectoryRun", "diversity", "evaluate", "export_scores", "fetch_summary",
    "fetch_task_data", "find_targets", "follow_trajectories", "follow_trajectory", "interpolate", "open_trajectory",
    "output_summary", "plot", "pythia_trajectory", "resolve_device", "result_rows", "run_trajectory",
    "savings_table", "scoring", "task_sources", "torch_dtype",
]
