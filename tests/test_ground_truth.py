"""Ground truth: the synthetic cache (activation_cache/synthetic.py) and the ground_truth
evaluator's maths (trainer/evaluators/ground_truth.py) on hand-built decoders."""

from __future__ import annotations

import math

import pytest
import torch

from activation_cache import (CacheConfig, ConfigError, CorruptCacheError, ModelSpec, UserError,
                              SyntheticSpec, build_cache, open_cache)
from activation_cache.synthetic import (frequencies, generate_window, generate_window_codes,
                                        ground_truth)
from trainer import (EvaluatorDataError, TrainingConfig, build_sae, evaluate_split, job_sources,
                     make_sae_config, train_sae)
from trainer.evaluators.ground_truth import matched_cosines, recovery_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def e(i: int, d: int = 8) -> torch.Tensor:
    v = torch.zeros(d)
    v[i] = 1.0
    return v


def rows(*vs: torch.Tensor) -> torch.Tensor:
    return torch.stack(list(vs))


# -- the metric on hand-built decoders -----------------------------------------------------------


def test_perfect_permuted_and_sign_flipped_decoders_score_one():
    truth = rows(e(0), e(1), e(2), e(3))
    assert recovery_metrics(truth, truth) == {"feature_mcc": 1.0, "feature_recall_0.9": 1.0}
    # permuted, sign-flipped and scaled rows are the same directions
    decoder = rows(-3 * e(2), e(0), 0.5 * e(3), -e(1))
    assert recovery_metrics(truth, decoder) == pytest.approx(
        {"feature_mcc": 1.0, "feature_recall_0.9": 1.0})


def test_half_recovered_and_partially_aligned_hand_cases():
    truth = rows(e(0), e(1), e(2), e(3))
    half = rows(e(0), e(1), e(4), e(5))  # two features found, two latents elsewhere
    assert recovery_metrics(truth, half) == pytest.approx(
        {"feature_mcc": 0.5, "feature_recall_0.9": 0.5})
    # one latent at cosine 0.8 (0.8 e0 + 0.6 e4), one exact: mcc (0.8 + 1) / 2, recall 1/2
    tilted = rows(0.8 * e(0) + 0.6 * e(4), e(1))
    assert recovery_metrics(rows(e(0), e(1)), tilted) == pytest.approx(
        {"feature_mcc": 0.9, "feature_recall_0.9": 0.5})
    # 0.95 passes the 0.9 threshold, 0.85 does not
    for cosine, recall in ((0.95, 1.0), (0.85, 0.5)):
        near = rows(cosine * e(0) + math.sqrt(1 - cosine**2) * e(4), e(1))
        assert recovery_metrics(rows(e(0), e(1)), near)["feature_recall_0.9"] == recall


def test_more_latents_than_features_and_fewer():
    truth = rows(e(0), e(1))
    wide = rows(e(5), e(1), e(6), e(0), e(7), torch.zeros(8))  # a dead (zero) row too
    assert recovery_metrics(truth, wide) == pytest.approx(
        {"feature_mcc": 1.0, "feature_recall_0.9": 1.0})
    narrow = rows(e(1))  # one latent for two features: the other is unmatched (0)
    assert matched_cosines(truth, narrow).tolist() == [0.0, 1.0]
    assert recovery_metrics(truth, narrow)["feature_mcc"] == pytest.approx(0.5)


def test_one_latent_cannot_explain_two_features():
    """The matching is one-to-one: two nearly parallel true features and one latent along them
    score (1 + 0) / 2 -- an argmax per feature would give ~1 for both."""
    f1 = 0.99 * e(0) + math.sqrt(1 - 0.99**2) * e(1)
    truth = rows(e(0), f1)
    decoder = rows(e(0), e(7))
    m = matched_cosines(truth, decoder)
    assert sorted(m.tolist()) == pytest.approx([0.0, 1.0], abs=1e-9)
    assert recovery_metrics(truth, decoder)["feature_mcc"] == pytest.approx(0.5)


def test_the_matching_maximises_the_total_not_each_feature_greedily():
    """Both features prefer latent a (cosines f0: a 0.9, b 0.8; f1: a 0.3, b 0); greedy
    (f0 takes a first) scores 0.9 + 0, the optimum gives f0 its second best: 0.8 + 0.3."""
    a = 0.9 * e(0) + 0.3 * e(1) + math.sqrt(1 - 0.81 - 0.09) * e(2)
    b = 0.8 * e(0) + 0.6 * e(3)
    m = matched_cosines(rows(e(0), e(1)), rows(a, b))
    assert m.tolist() == pytest.approx([0.8, 0.3])
    assert recovery_metrics(rows(e(0), e(1)), rows(a, b))["feature_mcc"] == pytest.approx(0.55)


# -- the generator ---------------------------------------------------------------------------------


def spec(**kw) -> SyntheticSpec:
    base = dict(n_features=32, d=12, num_tokens=2000, mean_active=3.0, seed=5)
    base.update(kw)
    return SyntheticSpec.from_dict(base)


def test_generator_is_seeded_and_deterministic():
    s = spec()
    t = ground_truth(s)
    assert torch.equal(t.directions, ground_truth(s).directions)
    assert torch.allclose(t.directions.norm(dim=1), torch.ones(32))
    a, b = generate_window(s, t, 3, 50), generate_window(s, t, 3, 50)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate_window(s, t, 4, 50))  # another window
    other = spec(seed=6)
    assert not torch.equal(t.directions, ground_truth(other).directions)


def test_frequencies_follow_the_power_law_and_the_activations_are_the_sum():
    s = spec(noise_std=0.0, n_features=16, mean_active=2.0, frequency_exponent=1.0)
    p = frequencies(s)
    assert float(p.sum()) == pytest.approx(2.0)
    assert float(p[0] / p[3]) == pytest.approx(4.0)  # (1/1) / (1/4)
    t = ground_truth(s)
    codes = torch.cat([generate_window_codes(s, t, w, 500) for w in range(40)])
    rate = (codes > 0).double().mean(0)
    assert torch.allclose(rate, p, atol=0.01)
    assert float((codes > 0).sum(1).double().mean()) == pytest.approx(2.0, abs=0.05)
    x = generate_window(s, t, 0, 500)
    assert torch.allclose(x, generate_window_codes(s, t, 0, 500) @ t.directions, atol=1e-5)


def test_hierarchy_and_correlation():
    s = spec(n_features=20, hierarchy={"parents": 2, "children_per_parent": 3},
             correlation=0.5)
    t = ground_truth(s)
    assert t.parents.tolist()[:8] == [-1, -1, 0, 0, 0, 1, 1, 1]
    codes = torch.cat([generate_window_codes(s, t, w, 500) for w in range(20)]) > 0
    for child in range(2, 8):
        parent = int(t.parents[child])
        assert not bool((codes[:, child] & ~codes[:, parent]).any())  # never without its parent
    free = codes[:, 8:].double()
    assert torch.allclose(free.mean(0), frequencies(s)[8:], atol=0.02)  # marginals kept
    c = torch.corrcoef(free.T)
    off = c[~torch.eye(c.shape[0], dtype=torch.bool)]
    assert float(off.mean()) > 0.05  # fire together
    indep = spec(n_features=20)
    ci = torch.corrcoef(torch.cat([generate_window_codes(indep, ground_truth(indep), w, 500)
                                   for w in range(20)]).gt(0).double()[:, 8:].T)
    assert abs(float(ci[~torch.eye(12, dtype=torch.bool)].mean())) < 0.02


def test_spec_validation():
    with pytest.raises(ConfigError, match="mean_active"):
        SyntheticSpec(n_features=4, mean_active=3.0, frequency_exponent=2.0)
    with pytest.raises(ConfigError, match="hierarchy"):
        SyntheticSpec.from_dict({"n_features": 8,
                                 "hierarchy": {"parents": 2, "children_per_parent": 4}})
    with pytest.raises(ConfigError, match="correlation"):
        SyntheticSpec(correlation=1.0)
    with pytest.raises(ConfigError, match="model: a synthetic cache runs no model"):
        CacheConfig(hooks=("synthetic",), synthetic=spec(), model=ModelSpec(source="tiny"))
    with pytest.raises(ConfigError, match="one hook"):
        CacheConfig(hooks=("a", "b"), synthetic=spec())
    with pytest.raises(ConfigError, match="max_tokens"):
        CacheConfig(hooks=("a",), synthetic=spec(), max_tokens=100)


# -- the cache ---------------------------------------------------------------------------------


def synthetic_cache(tmp_path, name="cache", **kw):
    cfg = CacheConfig.from_dict({
        "output": str(tmp_path / name), "hooks": ["synthetic"], "max_text_length": 50,
        "dtype": "float32", "val_fraction": 0.1, "test_fraction": 0.1,
        "shard_tokens": kw.pop("shard_tokens", 500), "synthetic": spec(**kw).to_dict()})
    return open_cache(build_cache(cfg))


def test_the_cache_stores_the_truth_and_the_generated_windows(tmp_path):
    reader = synthetic_cache(tmp_path)
    truth = reader.ground_truth()
    expect = ground_truth(spec())
    assert torch.equal(truth.directions, expect.directions) and truth.hook == "synthetic"
    assert torch.equal(truth.parents, expect.parents)
    assert reader.has_ground_truth and reader.manifest["logits"] is None
    assert set(reader.manifest["splits"]) == {"train", "val", "test"}
    assert reader.num_tokens("train") == 1600 and reader.num_tokens("test") == 200
    # windows are the generator's, whatever the sharding (another shard size: same tensors)
    other = synthetic_cache(tmp_path, "cache2", shard_tokens=10_000)
    for split in ("train", "test"):
        a = list(reader.sequence_batches(split, 8))
        b = list(other.sequence_batches(split, 8))
        assert all(torch.equal(x.acts["synthetic"], y.acts["synthetic"]) for x, y in zip(a, b))
        first = a[0]
        window = int(first.doc_id[0])
        assert torch.allclose(first.acts["synthetic"][0],
                              generate_window(spec(), expect, window, 50))
    assert bool(next(reader.sequence_batches("val", 4)).train_mask.all())


def test_a_changed_truth_file_is_refused(tmp_path):
    reader = synthetic_cache(tmp_path)
    path = tmp_path / "cache" / "ground_truth.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="ground truth fails its sha256"):
        open_cache(str(tmp_path / "cache")).ground_truth()
    assert reader.manifest["synthetic"]["spec"]["n_features"] == 32


# -- the evaluator in a job ------------------------------------------------------------------------


def test_ground_truth_evaluator_in_training_and_on_test(tmp_path):
    reader = synthetic_cache(tmp_path, n_features=16, d=12, num_tokens=20_000, mean_active=2.0,
                             noise_std=0.0)
    cfg = TrainingConfig(num_epochs=3, train_batch_tokens=256, log_freq=20, lr=1e-2,
                         show_progress=False, checkpoint_every=None,
                         evaluators=("ground_truth",), best_metric="feature_mcc",
                         best_mode="max")
    s = job_sources(reader, cfg, "synthetic")
    assert s.evaluators.names == ("reconstruction", "ground_truth")
    sae = build_sae(make_sae_config(d_in=12, d_sae=32, architecture="topk", top_k=3,
                                    hook_spec="synthetic"), seed=0)
    before = recovery_metrics(reader.ground_truth().directions, sae.W_dec)["feature_mcc"]
    result = train_sae(sae, s.train, cfg, val_source=s.val, evaluators=s.evaluators)
    final = result.final
    assert final.eval_split == "val" and final.fvu is not None
    assert final.get("feature_mcc") == pytest.approx(
        recovery_metrics(reader.ground_truth().directions, result.sae.W_dec)["feature_mcc"])
    assert final.get("feature_mcc") > before + 0.2 and final.get("feature_mcc") > 0.8
    test = evaluate_split(result.sae, s.test, cfg, split="test", evaluators=s.evaluators)
    assert test.get("feature_mcc") == final.get("feature_mcc")  # decoder-only: split-free
    assert 0 <= test.get("feature_recall_0.9") <= 1
    assert "evaluator_seconds/ground_truth" in test.scalars()


def test_ground_truth_on_a_cache_without_truth_is_one_line_before_training():
    class ModelCache:
        uri = "runs/cache-real"
        manifest = {"splits": {"train": {}, "val": {}}}

        def ground_truth(self):
            return None

    with pytest.raises(EvaluatorDataError, match="runs/cache-real holds no ground truth"):
        job_sources(ModelCache(), TrainingConfig(evaluators=("ground_truth",)), "h")


def test_eval_command_on_a_synthetic_cache_reports_recovery_and_e2e_is_refused(tmp_path):
    import io

    from trainer import evaluate_sae_dir, load_cache_model

    reader = synthetic_cache(tmp_path)
    truth = reader.ground_truth().directions
    sae = build_sae(make_sae_config(d_in=12, d_sae=40, architecture="topk", top_k=3,
                                    hook_spec="synthetic"), seed=1)
    with torch.no_grad():
        sae.W_dec[:32] = truth  # a decoder that holds every true feature
    sae.save(tmp_path / "sae")
    out = io.StringIO()
    record = evaluate_sae_dir(tmp_path / "sae", cache=str(tmp_path / "cache"), stream=out,
                              show_progress=False)
    assert record.eval_split == "test" and record.get("feature_mcc") == pytest.approx(1.0)
    text = out.getvalue()
    assert "feature_mcc" in text and "feature_recall_0.9" in text and "fvu" in text
    with pytest.raises(UserError, match="is synthetic"):
        load_cache_model(reader)
