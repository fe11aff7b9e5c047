"""Tune pickles the searcher whenever it saves the experiment state: every sampler the sweep
offers must survive a pickle round trip (Optuna 5's NSGA-II sampler holds a thread lock)."""

import pickle

from sweep.searcher import PicklableNSGAIISampler


def test_nsgaii_sampler_pickles_and_keeps_working():
    import optuna

    sampler = PicklableNSGAIISampler(seed=3, population_size=4)
    copy = pickle.loads(pickle.dumps(sampler))
    assert copy._thread_lock is not sampler._thread_lock
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=copy)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)),
                   n_trials=6)
    assert len(study.trials) == 6
