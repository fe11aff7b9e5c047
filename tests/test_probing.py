"""Sparse probing: the probe sets of a cache (activation_cache/probes.py, probe_writer.py) and
the probing evaluator's maths (trainer/evaluators/probing.py) on hand-made data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from activation_cache import (CacheMismatchError, ConfigError, CorruptCacheError, ProbesSpec,
                              open_cache)
from activation_cache.probes import load_probe_texts
from trainer.evaluators.probing import (ProbingEvaluator, mean_abs_normalise, rank_latents,
                                        sparse_probe_accuracies)
from trainer.evaluators import EvaluationContext, EvaluationData, EvaluatorDataError

from _cache_helpers import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def codes(n: int, d: int, seed: int = 0):
    """n texts, d latents of noise; label y; latent 3 fires (value 1-2) exactly on y=0 texts,
    latent 5 is large (x100) but only weakly related to y."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.5).long()
    z = torch.rand(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.3)
    z[:, 3] = (y == 0).float() * (1 + torch.rand(n, generator=g))
    z[:, 5] = 100 * torch.rand(n, generator=g) + 8 * y
    return z, y


def test_the_informative_latent_ranks_first_whatever_its_sign():
    z, y = codes(200, 12)
    order = rank_latents(z, y)
    # latent 3 fires on the negatives: a signed difference (mutation: no abs) ranks it last
    assert order[0].item() == 3
    # normalisation: latent 5's raw difference (~8) is larger than latent 3's (~1.5), but
    # per unit of its own scale it is small
    raw_diff = (z[y == 1].mean(0) - z[y == 0].mean(0)).abs()
    assert raw_diff.argmax().item() == 5


def test_mean_abs_normalise_hand_case():
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0], [4.0, -3.0]])
    out = mean_abs_normalise(z)
    # column 0: mean |.| over its 2 non-zeros = 3; column 1: 3 over 1 non-zero
    assert out[:, 0].tolist() == pytest.approx([2 / 3, 0, 4 / 3], rel=1e-5)
    assert out[:, 1].tolist() == pytest.approx([0, 0, -1], rel=1e-5)


def test_k1_probe_on_the_right_latent_is_accurate_and_test_part_is_held_out():
    z, y = codes(300, 12)
    zt, yt, ze, ye = z[:200], y[:200], z[200:], y[200:]
    acc = sparse_probe_accuracies(zt, yt, ze, ye, ks=(1, 2))
    assert acc[1] == 1.0  # latent 3 separates the labels exactly
    # a label-free eval part: the probe cannot be right on labels it never saw related
    shuffled = ye[torch.randperm(len(ye), generator=torch.Generator().manual_seed(1))]
    assert sparse_probe_accuracies(zt, yt, ze, shuffled, ks=(1,))[1] < 0.75


def test_smallest_difference_first_fails():
    """Mutation guard: picking the smallest differences gives chance accuracy at k=1."""
    z, y = codes(300, 12)
    order = rank_latents(z[:200], y[:200])
    worst = order[-1].item()
    assert worst not in (3, 5)


# -- probe sets in a cache ----------------------------------------------------------------------


def probe_file(tmp_path, n=60, name="mine.jsonl"):
    path = tmp_path / name
    rows = [{"text": ("good day " if i % 2 else "bad night ") * (1 + i % 3) + str(i),
             "label": "pos" if i % 2 else "neg"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_spec_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'glue_sst2'"):
        ProbesSpec.from_dict({"datasets": ["glue_sst"]})
    with pytest.raises(ConfigError, match="not a binary"):
        ProbesSpec.from_dict({"datasets": ["hist_fig_age"]})
    with pytest.raises(ConfigError, match="unknown key"):
        ProbesSpec.from_dict({"datasetz": ["glue_sst2"]})
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"txt": "a", "label": 1}))
    from activation_cache.probes import ProbeError
    with pytest.raises(ProbeError, match="no column 'text'.*did you mean 'txt'"):
        load_probe_texts(ProbesSpec.from_dict({"files": [{"path": str(bad)}]}))


def test_parts_are_stratified_deterministic_and_disjoint(tmp_path):
    spec = ProbesSpec.from_dict({"max_text_tokens": 16, "files": [{"path": str(probe_file(tmp_path, 100))}],
                                 "texts_per_set": 80, "seed": 3})
    a, = load_probe_texts(spec)
    b, = load_probe_texts(spec)
    assert a.texts == b.texts and (a.parts == b.parts).all()
    assert len(a.texts) == 80 and len(set(a.rows.tolist())) == 80
    for p in (0, 1, 2):
        labels = a.labels[a.parts == p]
        assert 0 < labels.sum() < len(labels)  # both labels in every part
    assert a.classes == ("neg", "pos")
    c, = load_probe_texts(spec.replace(seed=4))
    assert c.texts != a.texts


def test_cache_stores_last_token_activations_of_probe_texts(tmp_path):
    file = probe_file(tmp_path)
    spec = ProbesSpec.from_dict({"files": [{"path": str(file)}], "max_text_tokens": 12})
    uri, cfg, _ = build_tiny(tmp_path / "cache", probes=spec)
    reader = open_cache(uri)
    assert reader.probe_sets() == ["mine"]
    ps = reader.probe_set("mine")
    hook = cfg.hooks[0]
    x, yv = ps.part("train", hook)
    assert x.shape[1] == reader.d_in(hook) and len(ps) == 60
    # the stored row is the activation of the text's last token, run on its own
    from _cache_helpers import tiny_model
    model, _ = tiny_model()
    texts, = load_probe_texts(spec)
    i = 0
    ids = model.tokenizer([texts.texts[i]], add_special_tokens=False)["input_ids"][0]
    toks = torch.tensor([[model.tokenizer.bos_token_id] + list(ids)[-11:]])
    _, cache = model.run_with_cache(toks, names_filter=[hook])
    assert torch.allclose(ps.acts[hook][i], cache[hook][0, -1].float(), atol=1e-5)
    assert "probes: 1 sets" in __import__("activation_cache.builder", fromlist=["x"]) \
        .describe_cache(reader.manifest, uri)
    with pytest.raises(CacheMismatchError, match="did you mean 'mine'"):
        reader.probe_set("mien")


def test_probe_file_corruption_is_caught_and_old_caches_have_none(tmp_path):
    spec = ProbesSpec.from_dict({"max_text_tokens": 16, "files": [{"path": str(probe_file(tmp_path))}]})
    uri, _, _ = build_tiny(tmp_path / "cache", probes=spec)
    rec = open_cache(uri).manifest["probes"]["sets"]["mine"]
    path = tmp_path / "cache" / rec["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="sha256"):
        open_cache(uri).probe_set("mine")
    plain, _, _ = build_tiny(tmp_path / "plain")
    assert open_cache(plain).probe_sets() == []


def test_probe_sets_resume_after_a_kill(tmp_path):
    spec = ProbesSpec.from_dict({"max_text_tokens": 16, "files": [{"path": str(probe_file(tmp_path))},
                                           {"path": str(probe_file(tmp_path, 40, "b.jsonl"))}]})
    uri, cfg, windows = build_tiny(tmp_path / "cache", probes=spec)
    first = open_cache(uri).manifest["probes"]["sets"]
    root = tmp_path / "cache"
    (root / "manifest.json").unlink()  # as if killed after the probe sets, before the manifest
    b_record = root / first["b"]["file"].replace(".safetensors", ".json")
    mtime = b_record.stat().st_mtime_ns
    (root / first["mine"]["file"]).unlink()  # and the first set's file never landed
    uri2, _, _ = build_tiny(tmp_path / "cache", windows=windows, probes=spec)
    again = open_cache(uri2).manifest["probes"]["sets"]
    assert again["mine"]["sha256"] == first["mine"]["sha256"]
    assert b_record.stat().st_mtime_ns == mtime  # b was not recomputed


# -- the evaluator ------------------------------------------------------------------------------


class _IdentitySAE(torch.nn.Module):
    """encode = ReLU of a fixed matrix: the latents are known."""

    def __init__(self, w):
        super().__init__()
        self.W_enc = torch.nn.Parameter(w)
        self.cfg = type("C", (), {"d_sae": w.shape[1]})

    def encode(self, x):
        return torch.relu(x @ self.W_enc)


def test_evaluator_uses_val_for_selection_and_test_for_reports(tmp_path):
    spec = ProbesSpec.from_dict({"max_text_tokens": 16, "files": [{"path": str(probe_file(tmp_path, 80))}]})
    uri, cfg, _ = build_tiny(tmp_path / "cache", probes=spec)
    reader = open_cache(uri)
    ev = ProbingEvaluator()
    ev.prepare(EvaluationData(config=None, reader=reader, hook=cfg.hooks[0]))
    d = reader.d_in(cfg.hooks[0])
    sae = _IdentitySAE(torch.cat([torch.eye(d), -torch.eye(d)], 1))
    out = {}
    for split in ("val", "test"):
        ctx = EvaluationContext(split=split, source=None, max_tokens=None, final=True,
                                data=None)
        out[split] = ev.evaluate(sae, ctx)
    assert set(out["val"]) == set(ProbingEvaluator.field_names())
    for split in ("val", "test"):
        assert 0 <= out[split]["probe_accuracy_k1"] <= 1
        assert out[split]["probe_accuracy_ratio_k5"] == pytest.approx(
            out[split]["probe_accuracy_k5"] / out[split]["probe_accuracy_raw"])
    # the raw ceiling of each part is that part's
    assert out["val"]["probe_accuracy_raw"] == pytest.approx(ev.raw["mine"]["val"])
    assert out["test"]["probe_accuracy_raw"] == pytest.approx(ev.raw["mine"]["test"])


def test_evaluator_refuses_a_cache_without_probes(tmp_path):
    uri, cfg, _ = build_tiny(tmp_path / "plain")
    with pytest.raises(EvaluatorDataError, match="probes:"):
        ProbingEvaluator().prepare(EvaluationData(config=None, reader=open_cache(uri),
                                                  hook=cfg.hooks[0]))


def test_evaluator_scores_the_held_out_part_not_the_train_part():
    """Hand-set probe parts: latent 3 separates the train part exactly, while the val and test
    labels are unrelated to it -- a probe scored on its own train part would read 1.0."""
    z, y = codes(300, 12)
    g = torch.Generator().manual_seed(5)
    ev = ProbingEvaluator()
    ev.sets = {"s": {"train": (z[:200], y[:200]),
                     "val": (z[200:250], y[200:250][torch.randperm(50, generator=g)]),
                     "test": (z[250:], y[250:])}}
    ev.raw = {"s": {"val": 1.0, "test": 1.0}}
    sae = _IdentitySAE(torch.eye(12))
    ctx = lambda split: EvaluationContext(split=split, source=None, max_tokens=None, final=True,
                                          data=None)
    assert ev.evaluate(sae, ctx("test"))["probe_accuracy_k1"] == 1.0
    assert ev.evaluate(sae, ctx("val"))["probe_accuracy_k1"] < 0.8


def test_probing_in_a_job_final_val_record_and_reported_test(tmp_path):
    from trainer import (TrainingConfig, build_sae, evaluate_split, job_sources,
                         make_sae_config, train_sae)

    spec = ProbesSpec.from_dict({"max_text_tokens": 16,
                                 "files": [{"path": str(probe_file(tmp_path, 80))}]})
    from _cache_helpers import random_windows, tiny_windows
    windows = dict(tiny_windows(), test=random_windows(6, seed=3, first_doc=200))
    uri, cfg, _ = build_tiny(tmp_path / "cache", windows=windows, probes=spec)
    reader = open_cache(uri)
    hook = cfg.hooks[0]
    tcfg = TrainingConfig(num_epochs=1, train_batch_tokens=64, log_freq=5, lr=1e-3,
                          show_progress=False, checkpoint_every=None, evaluators=("probing",))
    s = job_sources(reader, tcfg, hook)
    assert s.evaluators.names == ("reconstruction", "probing")
    d = reader.d_in(hook)
    sae = build_sae(make_sae_config(d_in=d, d_sae=4 * d, architecture="topk", top_k=4,
                                    hook_spec=hook), seed=0)
    result = train_sae(sae, s.train, tcfg, val_source=s.val, evaluators=s.evaluators)
    assert result.final.eval_split == "val"
    assert 0 <= result.final.get("probe_accuracy_k5") <= 1
    intermediate = [r for r in result.history if r is not result.final]
    assert all(r.get("probe_accuracy_k5") is None for r in intermediate)  # final only
    test = evaluate_split(result.sae, s.test, tcfg, split="test", evaluators=s.evaluators)
    assert 0 <= test.get("probe_accuracy_k20") <= 1
    assert "evaluator_seconds/probing" in test.scalars()


def test_the_raw_ceiling_is_fitted_once_per_process_per_data(monkeypatch):
    import torch

    import trainer.evaluators.probing as probing

    calls = []
    real = probing.fit_probe
    monkeypatch.setattr(probing, "fit_probe", lambda x, y: calls.append(1) or real(x, y))
    g = torch.Generator().manual_seed(0)

    def parts(shift):
        x = torch.randn(40, 4, generator=g)
        y = (x[:, 0] > 0).long()
        x[:, 0] += shift
        return {"train": (x[:20], y[:20]), "val": (x[20:30], y[20:30]), "test": (x[30:], y[30:])}

    a = parts(0.0)
    first = probing.raw_ceiling(a)
    assert probing.raw_ceiling(a) == first and len(calls) == 1  # the same data: remembered
    probing.raw_ceiling(parts(0.5))
    assert len(calls) == 2  # other data: fitted anew
    assert set(first) == {"val", "test"} and all(0.0 <= v <= 1.0 for v in first.values())
