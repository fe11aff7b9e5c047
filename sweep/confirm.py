"""The confirm stage: re-train a sweep's best configurations with new seeds, in the same run.

With ``confirm: {top: N, seeds: M}`` in the sweep YAML (:class:`~sweep.sweep_config.ConfirmConfig`),
the driver runs two stages under one lock and one Ray session:

1. **search**: the Optuna-guided trials (``num_samples`` of them), as without ``confirm``;
2. **confirm**: the N best configurations -- completed trials meeting the sweep's constraints,
   ranked on the objective's (first) validation metric, exactly what ``best`` ranks first; N per
   hook when the table has a ``hook`` column -- are each re-trained with M new seeds. The
   original trial's seed is ``training.seed`` (default: the sweep's ``seed``) s; its
   replicates get s+1 ... s+M (``training.seed`` seeds the SAE's initial weights and its data
   order). A replicate is a trial like any other (same trainable, budget, resources, retries,
   results and history rows) whose config is the original trial's config plus ``seed`` and the
   label ``replicate_of`` (see :mod:`sweep.replicates`); no scheduler stops it and the time
   budget does not apply (a cut replicate would say nothing about seed noise).

**The Optuna study never sees a replicate**: the confirm stage is a separate Ray Tune run
(``<tune path>-confirm``) whose trials come from a fixed list (:class:`ReplicateList`); the
search stage's ``SweepSearcher`` is not part of it, so no replicate is ever told to the study
as a new search point.

**Surviving a killed driver**: before the first replicate starts, the plan -- every replicate
(``replicate_of``, ``seed``, config) and the Tune runs ("rounds") started for them -- is written
to ``EXPERIMENT_DIR/confirm.json``. ``--resume`` reads it: the search stage, finished, is not run
again (not even restored); the last round is restored from Tune's state when it can be (its
unfinished replicates continue from their checkpoints), and any planned replicate without a
completed or failed row (e.g. one the dead driver had started before Tune saved it) runs in a
new round. A replicate that completed is never run again, and none is lost (a round that Tune
could not save is re-planned from the table). Rows of replicates a dead driver lost stay in the
table as ``interrupted``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
from ray.tune.search import Searcher

from .best import select_best
from .replicates import REPLICATE_OF, SEED
from .results import ResultsNotFoundError, load_results
from .sweep_config import SweepConfig

logger = logging.getLogger("sweep.confirm")

CONFIRM_FILE = "confirm.json"
"""The confirm stage's plan and the Tune runs started for it (see the module docstring)."""
MAX_ROUNDS = 3
"""Tune runs one driver starts for the confirm stage at most (the first, and re-runs of
replicates a run lost)."""
SETTLED_STATUSES = ("completed", "failed")
"""A planned replicate with a row of one of these statuses is done (a diverged replicate is
not run again: it would diverge again)."""


def confirm_planned(experiment_dir: str | Path) -> bool:
    """Whether the sweep's search stage ended and its confirm stage was planned."""
    return (Path(experiment_dir) / CONFIRM_FILE).is_file()


def read_plan(experiment_dir: str | Path) -> Optional[dict[str, Any]]:
    path = Path(experiment_dir) / CONFIRM_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_plan(experiment_dir: str | Path, plan: dict[str, Any]) -> None:
    path = Path(experiment_dir) / CONFIRM_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, path)


def original_seed(cfg: SweepConfig) -> int:
    """The seed the search trials trained with."""
    return int(cfg.training.get("seed", cfg.seed))


def replicate_seeds(cfg: SweepConfig) -> list[int]:
    """The confirm stage's new seeds: the search trials' seed + 1 ... + ``confirm.seeds``."""
    assert cfg.confirm is not None
    s = original_seed(cfg)
    return [s + i for i in range(1, cfg.confirm.seeds + 1)]


def choose_configurations(frame: pd.DataFrame, cfg: SweepConfig) -> list[str]:
    """The trial ids to confirm: the ``confirm.top`` best search trials (``best``'s ranking:
    completed, finite, meeting the constraints), per hook when there is a ``hook`` column."""
    assert cfg.confirm is not None
    if REPLICATE_OF in frame.columns:
        frame = frame[frame[REPLICATE_OF].isna()]
    objective = cfg.to_dict()["objective"]
    groups = ([g for _, g in frame.groupby(frame["hook"].astype(str), sort=True)]
              if "hook" in frame.columns and frame["hook"].notna().any() else [frame])
    chosen: list[str] = []
    for group in groups:
        best = select_best(group, objective=objective, top=cfg.confirm.top)
        chosen += [str(t) for t in best["trial_id"]]
    return chosen


def plan_replicates(frame: pd.DataFrame, configs: dict[str, dict[str, Any]],
                    cfg: SweepConfig) -> list[dict[str, Any]]:
    """One entry per replicate: ``{"replicate_of", "seed", "config"}`` (``config``: the
    original trial's Tune config with ``seed`` and ``replicate_of`` set)."""
    entries = []
    for tid in choose_configurations(frame, cfg):
        if tid not in configs:
            logger.warning("trial %s: its config is not in Ray Tune's state; it is not "
                           "confirmed", tid)
            continue
        for seed in replicate_seeds(cfg):
            config = {**configs[tid], REPLICATE_OF: tid, SEED: seed}
            entries.append({"replicate_of": tid, "seed": seed, "config": config})
    return entries


def pending_replicates(plan: dict[str, Any], frame: Optional[pd.DataFrame]) -> list[dict]:
    """The planned replicates without a completed or failed row in ``frame``."""
    done: set[tuple[str, int]] = set()
    if frame is not None and len(frame) and REPLICATE_OF in frame.columns and SEED in frame.columns:
        rows = frame[frame["status"].isin(SETTLED_STATUSES) & frame[REPLICATE_OF].notna()]
        done = {(str(r), int(s)) for r, s in zip(rows[REPLICATE_OF], rows[SEED])
                if pd.notna(s)}
    return [e for e in plan["replicates"] if (str(e["replicate_of"]), int(e["seed"])) not in done]


def round_path(tune_path: str, number: int) -> str:
    """Where the confirm stage's ``number``-th Tune run keeps its state (next to the search's)."""
    return f"{tune_path.rstrip('/')}-confirm" + ("" if number == 1 else f"-{number}")


class ReplicateList(Searcher):
    """A Tune searcher that hands out a fixed list of trial configs, in order, then FINISHED
    (Tune's ``BasicVariantGenerator`` needs every key of a preset point in ``param_space``,
    and replicates of different architectures have different keys). Its position is saved
    with Tune's experiment state, so a restored run does not hand a config out twice."""

    def __init__(self, configs: list[dict[str, Any]]):
        super().__init__()
        self._configs = [dict(c) for c in configs]
        self._next = 0

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict,
                              **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> Optional[dict]:
        if self._next >= len(self._configs):
            return Searcher.FINISHED
        config = dict(self._configs[self._next])
        self._next += 1
        return config

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None,
                          error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"configs": self._configs,
                                                     "next": self._next}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self._configs, self._next = state["configs"], int(state["next"])


def run_confirm_stage(cfg: SweepConfig, tune_path: str, *, resumed: bool,
                      search_configs: Callable[[], dict[str, dict[str, Any]]],
                      run_round: Callable[[str, Optional[list[dict]]], None],
                      can_restore: Callable[[str], bool],
                      interrupted: Callable[[], bool]) -> None:
    """Plan the confirm stage (once) and run it to the end (see the module docstring).

    ``search_configs()``: the search trials' Tune configs by trial id; ``run_round(path,
    entries)``: run a new Tune run of ``entries`` at ``path``, or restore the one there
    (``entries`` None); ``can_restore(path)``: Tune holds state there; ``interrupted()``: a
    Ctrl-C stopped the last run (then this returns, and ``--resume`` continues)."""
    exp = cfg.experiment_path
    plan = read_plan(exp)
    if plan is None:
        frame = _results(exp)
        if frame is None or frame.empty:
            logger.warning("confirm stage: no search trial finished; nothing to confirm")
            return
        entries = plan_replicates(frame, search_configs(), cfg)
        assert cfg.confirm is not None
        plan = {"top": cfg.confirm.top, "seeds": replicate_seeds(cfg),
                "configurations": list(dict.fromkeys(e["replicate_of"] for e in entries)),
                "replicates": entries, "rounds": [],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_plan(exp, plan)
        if not entries:
            logger.warning("confirm stage: no completed trial meets the constraints; nothing "
                           "to confirm")
            return
        logger.info("confirm stage: re-training the %d best configuration(s) (%s) with seeds "
                    "%s: %d replicate(s)", len(plan["configurations"]),
                    ", ".join(plan["configurations"]), ", ".join(map(str, plan["seeds"])),
                    len(entries))
    restore = resumed
    for _ in range(MAX_ROUNDS):
        rounds = plan["rounds"]
        if restore and rounds and can_restore(rounds[-1]):
            logger.info("confirm stage: resuming %s", Path(rounds[-1]).name)
            run_round(rounds[-1], None)
        else:
            pending = pending_replicates(plan, _results(exp))
            if not pending:
                break
            path = round_path(tune_path, len(rounds) + 1)
            plan["rounds"].append(path)
            write_plan(exp, plan)  # before Tune starts: a resumed driver finds the round
            if rounds[:-1]:
                logger.info("confirm stage: running %d replicate(s) a stopped driver left "
                            "unfinished", len(pending))
            run_round(path, pending)
        restore = False
        if interrupted():
            return
    missing = pending_replicates(plan, _results(exp))
    if missing:
        logger.warning("confirm stage: %d replicate(s) did not finish: %s", len(missing),
                       ", ".join(f"{e['replicate_of']} seed {e['seed']}" for e in missing))


def _results(exp: Path) -> Optional[pd.DataFrame]:
    try:
        return load_results(exp)
    except ResultsNotFoundError:
        return None
