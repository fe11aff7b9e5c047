"""sweep: Optuna-guided Ray Tune sweeps over SAE hyperparameters, results tables, best, export.

Public API (everything else in this package is internal):

    SweepConfig                         -- the sweep YAML (validated, unknown keys rejected)
    run_sweep, resume_sweep             -- run a sweep on local Ray or a cluster; continue one
    SweepInterrupted                    -- what they raise after a Ctrl-C (a KeyboardInterrupt)
    print_best                          -- best trials / Pareto front from results.parquet
    export_trial                        -- a trial's SAE (SAELens or native) with a README card
    write_report                        -- PNG plots: Pareto fronts, training curves
    run_demo                            -- the main job on the embedded default
    load_results, load_history          -- the results tables as pandas DataFrames
    summarize_sweep                     -- the best trials and the next commands, as text
"""

from .best import print_best
from .demo import run_demo
from .driver import SweepInterrupted, resume_sweep, run_sweep
from .export import export_trial
from .report import write_report
from .results import load_history, load_results
from .summary import summarize_sweep
from .sweep_config import SweepConfig

__all__ = [
    "SweepConfig", "run_sweep", "resume_sweep", "print_best", "export_trial", "write_report",
    "run_demo", "load_results", "load_history", "summarize_sweep", "SweepInterrupted",
]
