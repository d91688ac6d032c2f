"""Config: grouped optimizer/schedule options, old config.json files, --set, phases."""
import pytest

from jcv.train import Config, optim

OLD = {"optimizer": "muon", "momentum": 0.85, "nesterov": True, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
       "rms_decay": 0.9, "muon_learning_rate": 0.06, "muon_momentum": 0.6, "muon_ns_steps": 3,
       "muon_normalize_weights": True, "muon_fallback": "sgd", "schedule": "triangle",
       "final_lr_fraction": 0.0, "step_decay_epochs": [], "step_decay_factor": 0.1,
       "onecycle_pct_start": 0.23, "onecycle_div_factor": 5.0, "onecycle_final_div_factor": 2.0}


def test_old_flat_config_json_is_read_into_the_groups():
  config = Config.from_dict(OLD).validate()
  assert config.optimizer_options == {
      "learning_rate": 0.06, "momentum": 0.6, "nesterov": True, "ns_steps": 3, "normalize_weights": True,
      "fallback": "sgd", "fallback_options": {"momentum": 0.85, "nesterov": True}}
  assert config.schedule_options == {"pct_start": 0.23, "div_factor": 5.0, "final_div_factor": 2.0}
  assert Config.from_dict(config.to_dict()) == config
  assert Config(momentum=0.5).optimizer_options == {"momentum": 0.5}  # older keyword names still work
  assert (config.momentum, config.muon_ns_steps, config.onecycle_pct_start) == (0.85, 3, 0.23)  # and reads


def test_one_table_per_optimizer_and_schedule():
  assert set(optim.OPTIMIZERS) == {"sgd", "adamw", "rmsprop", "lamb", "muon"}
  assert set(optim.SCHEDULES) == {"cosine", "onecycle", "triangle", "linear", "step", "constant"}
  with pytest.raises(ValueError, match=r"optimizer 'adamw' has no option\(s\) \['momentum'\]"):
    Config(optimizer="adamw", optimizer_options={"momentum": 0.9}).validate()
  with pytest.raises(ValueError, match="schedule must be one of"):
    Config(schedule="poly").validate()
  assert optim.optimizer_options(Config(optimizer="adamw")) == {"b1": 0.9, "b2": 0.999, "eps": 1e-8}


def test_set_reaches_into_groups_and_resets_them_with_the_name():
  c = Config().set(["optimizer_options.momentum=0.8", "schedule=onecycle", "schedule_options.pct_start=0.3"])
  assert c.optimizer_options == {"momentum": 0.8} and c.schedule_options == {"pct_start": 0.3}
  c = c.set(["optimizer=adamw"])  # another optimizer starts from its own defaults
  assert c.optimizer_options == {} and c.validate()
  assert Config().set(["optimizer_options={'nesterov': False}"]).optimizer_options == {"nesterov": False}
  with pytest.raises(ValueError, match="not a dict field"):
    Config().set(["epochs.x=1"])


def test_normalisation_and_label_smoothing_have_one_place():
  with pytest.raises(ValueError, match="mean/std"):
    Config(augment=(("normalize", {"mean": (0.5,) * 3, "std": (0.5,) * 3}),)).validate()
  with pytest.raises(ValueError, match="label_smoothing"):
    Config(augment=("flip", ("label_smoothing", {"epsilon": 0.1}))).validate()


def test_phases_inherit_fields_and_scale_with_epochs():
  c = Config(learning_rate=0.1, steps=50, phases=({"epochs": 15, "trainable": "head"},
                                                   {"epochs": 5, "trainable": 3, "learning_rate": 0.01}))
  head, tune = c.phase_configs()
  assert (head.learning_rate, head.trainable, head.steps, head.phases) == (0.1, "head", None, ())
  assert (tune.learning_rate, tune.trainable) == (0.01, 3)
  assert [p["epochs"] for p in c.with_epochs(8).phases] == [6, 2]
  with pytest.raises(ValueError, match="phase 1"):
    c.replace(phases=({"epochs": 1}, {"epochs": 1, "trainable": "some"})).validate()
  with pytest.raises(ValueError, match="cannot be set per phase"):
    c.replace(phases=({"phases": ()},)).validate()
