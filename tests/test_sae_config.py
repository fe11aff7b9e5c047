"""SAEConfig and TrainingConfig: defaults, derived fields, validation messages, round trips."""

import pytest
import yaml

import trainer
from activation_cache import ConfigError, UserError
from trainer import make_sae_config, sae_config_from_dict, SAEConfig, TrainingConfig


def test_hook_spec_is_derived_and_follows_layer_and_name():
    cfg = make_sae_config(d_in=8, d_sae=32, top_k=4)
    assert cfg.hook_spec == "blocks.9.hook_resid_post"
    moved = cfg.replace(hook_layer=3, hook_name="hook_mlp_out")
    assert moved.hook_spec == "blocks.3.hook_mlp_out"
    assert make_sae_config(d_in=8, d_sae=32, top_k=4, hook_layer="14").hook_spec == "blocks.14.hook_resid_post"
    explicit = make_sae_config(d_in=8, d_sae=32, top_k=4, hook_spec="hook_embed")
    assert explicit.hook_spec == "hook_embed"
    assert sae_config_from_dict(explicit.to_dict()).hook_spec == "hook_embed"


def test_top_k_aux_default_follows_top_k_and_is_settable():
    assert make_sae_config(d_in=8, d_sae=32, top_k=9).top_k_aux == 4
    assert make_sae_config(d_in=8, d_sae=32, top_k=1).top_k_aux == 1  # max(1, 1 // 2)
    assert make_sae_config(d_in=8, d_sae=32, top_k=8).replace(top_k=16).top_k_aux == 8
    assert make_sae_config(d_in=8, d_sae=32, top_k=8, top_k_aux=20).replace(top_k=16).top_k_aux == 20
    with pytest.raises(AttributeError, match=r"SAEConfig has no field 'top_k_aux' \(architecture 'standard'\)"):
        make_sae_config(d_in=8, d_sae=32, architecture="standard").top_k_aux


def test_architecture_fields_belong_to_their_architecture():
    # a field of another architecture is refused, naming who owns it
    with pytest.raises(ConfigError, match=r"SAEConfig.top_k: does not apply to architecture "
                                          r"'standard' \(it is a field of batchtopk"):
        make_sae_config(d_in=8, d_sae=32, architecture="standard", top_k=4)
    with pytest.raises(ConfigError, match=r"SAEConfig.l1_coefficient: does not apply to "
                                          r"architecture 'topk'"):
        sae_config_from_dict({"d_in": 8, "d_sae": 32, "architecture": "topk", "top_k": 4,
                             "l1_coefficient": 0.1})
    # each architecture's own fields round-trip flat
    for arch, extra in [("standard", {"l1_coefficient": 0.2}), ("topk", {"top_k": 3}),
                        ("jumprelu", {"l0_coefficient": 0.5, "jumprelu_bandwidth": 0.1}),
                        ("matryoshka_batchtopk", {"top_k": 3, "group_fractions": [0.25, 0.75]})]:
        cfg = sae_config_from_dict({"d_in": 8, "d_sae": 32, "architecture": arch, **extra})
        assert sae_config_from_dict(cfg.to_dict()) == cfg
        for key, value in extra.items():
            assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) else value)
    # replace() keeps the architecture: another one is another config, with its own options
    with pytest.raises(ConfigError, match="replace\\(\\) keeps the architecture"):
        make_sae_config(d_in=8, d_sae=32, top_k=4).replace(architecture="standard")
    # the flat form is the registry's: SAEConfig alone does not know the architectures
    with pytest.raises(ConfigError, match="trainer.sae_config_from_dict"):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 32, "top_k": 4})
    with pytest.raises(ConfigError, match="SAEConfig.options: the fields of architecture"):
        SAEConfig(d_in=8, d_sae=32, architecture="standard")
    with pytest.raises(ConfigError, match="group_fractions: must sum to 1"):
        make_sae_config(d_in=8, d_sae=32, architecture="matryoshka_batchtopk", top_k=2,
                  group_fractions=(0.5, 0.25))


def test_round_trip_dict_and_yaml():
    cfg = make_sae_config(d_in=8, d_sae=32, top_k=4, top_k_aux=7, aux_penalty=0.5, dtype="float64")
    assert sae_config_from_dict(cfg.to_dict()) == cfg
    assert sae_config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    tc = TrainingConfig(lr=None, block_mse_layers=(3, 4), use_block_mse=True, max_tokens=10_000)
    assert TrainingConfig.from_dict(tc.to_dict()) == tc
    assert TrainingConfig.from_yaml(tc.to_yaml()).block_mse_layers == (3, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_in=8, d_sae=32, top_k=0), "SAEConfig.top_k: must be an integer >= 1, got 0"),
    (dict(d_in=8, d_sae=32, top_k=33), "SAEConfig.top_k: must be in [1, d_sae=32], got 33"),
    (dict(d_in=8, d_sae=32), "SAEConfig.top_k: is required for the k-sparse architectures"),
    (dict(d_in=0, d_sae=32, top_k=1), "SAEConfig.d_in: must be >= 1"),
    (dict(d_in=8, d_sae=32, top_k=4, architecture="top-k"), "SAEConfig.architecture: must be one of"),
    (dict(d_in=8, d_sae=32, top_k=4, dtype="float8"), "SAEConfig.dtype"),
    (dict(d_in=8, d_sae=32, top_k=4, top_k_aux=0), "SAEConfig.top_k_aux: must be an integer >= 1"),
    (dict(d_in=8, d_sae=32, top_k=4, top_k_aux=33), "SAEConfig.top_k_aux: must be in [1, d_sae=32]"),
    (dict(d_in=8, d_sae=32, top_k=4, n_batches_to_dead=0), "SAEConfig.n_batches_to_dead"),
    (dict(d_in=8, d_sae=32, top_k=4, aux_penalty=-1.0), "SAEConfig.aux_penalty"),
    (dict(d_in=8, d_sae=32, top_k=4, device="gpu7"), "SAEConfig.device"),
])
def test_sae_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        make_sae_config(**kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, UserError)


def test_unknown_keys_and_use_error_term():
    with pytest.raises(ConfigError, match=r"unknown key 'topk' \(did you mean 'top_k'\?\)"):
        sae_config_from_dict({"d_in": 8, "d_sae": 32, "topk": 4})
    # ported configs with use_error_term: false load; true is explained and rejected
    cfg = sae_config_from_dict({"d_in": 8, "d_sae": 32, "top_k": 4, "use_error_term": False})
    assert "use_error_term" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="use_error_term: not supported.*hooked SAE wrapper"):
        sae_config_from_dict({"d_in": 8, "d_sae": 32, "top_k": 4, "use_error_term": True})


def test_training_config_defaults_cover_design_notes_fields():
    tc = TrainingConfig()
    notes_fields = ["num_epochs", "batch_size", "lr", "use_end_to_end",
                    "reconstruction_loss_weight", "use_block_mse", "block_mse_weight",
                    "block_mse_layers", "use_logit_kl", "logit_kl_weight", "log_freq",
                    "activation_batch_size"]
    for name in notes_fields:
        assert hasattr(tc, name), name
    # the design notes' fields that nothing read are refused with what to use instead
    for name, hint in [("num_dataloader_workers", "never read"), ("pin_memory", "never read"),
                       ("persistent_workers", "never read"),
                       ("max_text_length", "max_text_length in the cache config")]:
        with pytest.raises(ConfigError, match=f"TrainingConfig.{name}: no longer a field.*{hint}"):
            TrainingConfig.from_dict({name: 1})
    assert tc.num_epochs == 10 and tc.batch_size == 32 and tc.log_freq == 100
    assert tc.outlier_policy == "drop" and tc.outlier_norm_multiple == 10.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_end_to_end=True, use_logit_kl=False, use_block_mse=False),
     "TrainingConfig.use_end_to_end: needs use_logit_kl or use_block_mse"),
    (dict(block_mse_layers=(3,)), "TrainingConfig.block_mse_layers: is set but use_block_mse is false"),
    (dict(lr=0.0), "TrainingConfig.lr: must be > 0"),
    (dict(lr_decay_fraction=1.5), "TrainingConfig.lr_decay_fraction"),
    (dict(max_grad_norm=0.0), "TrainingConfig.max_grad_norm"),
    (dict(train_batch_tokens=0), "TrainingConfig.train_batch_tokens"),
    (dict(outlier_policy="cap"), "TrainingConfig.outlier_policy: must be one of drop, clip, none"),
    (dict(outlier_norm_multiple=0.5), "TrainingConfig.outlier_norm_multiple"),
    (dict(b_dec_init="median"), "TrainingConfig.b_dec_init"),
    (dict(best_metric="accuracy"), "TrainingConfig.best_metric: must be a numeric MetricsRecord field"),
    (dict(max_tokens=0), "TrainingConfig.max_tokens"),
    (dict(checkpoint_every=True), "TrainingConfig.checkpoint_every: must be an integer"),
    (dict(seed=True), "TrainingConfig.seed: must be an integer"),
])
def test_training_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        TrainingConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("name, value", [("threshold_warmup_steps", 10), ("threshold_beta", 0.99),
                                         ("calibrate_threshold", False),
                                         ("calibration_tokens", 512), ("l1_coefficient", 0.1)])
def test_a_field_of_an_architecture_under_training_says_where_it_lives(name, value):
    """The threshold's warm-up, EMA rate and calibration moved from TrainingConfig to the
    options of the architectures with a threshold: one line says so, naming them."""
    with pytest.raises(ConfigError) as err:
        TrainingConfig.from_dict({"lr": 1e-3, name: value})
    message = str(err.value)
    assert message.startswith(f"TrainingConfig.{name}: not a training field: it belongs to the "
                              "SAE config of architecture(s) ")
    assert f"move it to the `sae:` block (sae.{name})" in message and "\n" not in message
    owners = trainer.field_catalog().owners(name)
    assert owners and ", ".join(owners) in message
    # ... and that is where it works
    arch = owners[0]
    extra = {"top_k": 4} if "top_k" in trainer.field_catalog().owned[arch] else {}
    cfg = make_sae_config(d_in=8, d_sae=32, architecture=arch, **{name: value}, **extra)
    assert getattr(cfg, name) == value


def test_training_config_end_to_end_ok_with_kl_and_auto_lr():
    assert TrainingConfig(use_end_to_end=True).use_logit_kl
    assert TrainingConfig(lr=None).resolved_lr(2**14) == pytest.approx(2e-4)
    assert TrainingConfig(lr=None).resolved_lr(2**16) == pytest.approx(1e-4)
    assert TrainingConfig(lr=3e-4).resolved_lr(2**16) == 3e-4
    # YAML reads 1e-3 as a string; it is converted
    assert TrainingConfig.from_yaml("lr: 1e-3\n").lr == 1e-3
