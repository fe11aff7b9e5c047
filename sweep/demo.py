"""Placeholder replaced below."""


def run_demo(out_dir="runs/demo", num_samples=None, max_concurrent=None):  # pragma: no cover
    raise NotImplementedError
