"""Config: typed sections, replace/set with dotted paths, durations, phases, config.json."""
import dataclasses
import json

import pytest

from jcv.train import Config, Muon, Optim, Phase, Pretrained, Schedule, durations, optim
from jcv.train.config import CONFIG_FORMAT

# airbench94_muon's optimizer and schedule as sections (the grouped options of before, named).
MUON_TRIANGLE = Config(
    optim=Optim(name="sgd", momentum=0.85, nesterov=True,
                muon=Muon(learning_rate=0.06, momentum=0.6, nesterov=True, ns_steps=3, normalize_weights=True)),
    schedule=Schedule(name="triangle", pct_start=0.23, div_factor=5.0, final_div_factor=2.0))

# A config.json of jcv 0.1.0: flat fields, no "format".
OLD = {"optimizer": "muon", "momentum": 0.85, "nesterov": True, "muon_learning_rate": 0.06, "schedule": "triangle",
       "onecycle_pct_start": 0.23, "epochs": 10, "learning_rate": 0.1}


def test_every_field_is_a_section():
  fields = dataclasses.fields(Config)
  assert len(fields) <= 10
  for f in fields:
    value = getattr(Config(), f.name)
    assert dataclasses.is_dataclass(value)


def test_to_dict_from_dict_round_trip_through_json():
  config = MUON_TRIANGLE.replace(
      model={"name": "cifar_cnn", "options": {"widths": (8, 16)}},
      init={"pretrained": Pretrained(weights="w.npz"), "trainable": 2, "feature_cache": {"crop_views": 1}},
      optim={"lookahead": {"every": 5}, "freeze": ("^whiten/",), "lr_multipliers": {"bias": 0.5},
             "group_lengths": {"bias": "3 epochs"}},
      run={"length": "20 epochs", "phases": (Phase(length="15 epochs", trainable="head"), Phase(length="5 epochs", learning_rate=0.01))})
  config.validate()
  d = config.to_dict()
  assert d["format"] == CONFIG_FORMAT and d["optim"]["muon"]["ns_steps"] == 3
  assert d["run"]["phases"][0]["length"] == "15 epochs"
  assert d["model"]["options"]["widths"] == [8, 16]  # JSON lists
  again = Config.from_dict(json.loads(json.dumps(d)))
  assert again == config
  assert again.model.options["widths"] == (8, 16) and again.run.phases[1] == Phase(length="5 epochs", learning_rate=0.01)


def test_old_flat_config_json_is_refused_in_one_line():
  with pytest.raises(ValueError, match="written by jcv 0.1.0") as e:
    Config.from_dict(OLD)
  assert "\n" not in str(e.value) and f"config format {CONFIG_FORMAT}" in str(e.value)
  with pytest.raises(ValueError, match="written by jcv 0.1.0"):
    Config.from_dict({"learning_rate": 0.1})  # even one field of the flat layout
  with pytest.raises(ValueError, match=r"unknown config section\(s\) \['epochs'\]"):
    Config.from_dict({"format": CONFIG_FORMAT, "epochs": 3})
  with pytest.raises(TypeError):  # the flat keywords are gone too
    Config(learning_rate=0.1)


def test_replace_changes_the_named_fields_of_a_section():
  base = Config(optim={"name": "sgd", "learning_rate": 0.2, "momentum": 0.8})
  c = base.replace(optim={"learning_rate": 0.05}, run={"length": "3 epochs"})
  assert (c.optim.learning_rate, c.optim.momentum, c.run.length, c.run.seed) == (0.05, 0.8, "3 epochs", 0)
  assert base.optim.learning_rate == 0.2  # frozen: a copy
  assert c.replace(optim=Optim()).optim == Optim()  # a section object replaces the whole section
  with pytest.raises(ValueError, match="unknown config section 'optimm' \\(did you mean 'optim'\\?\\)"):
    base.replace(optimm={"learning_rate": 0.1})
  with pytest.raises(ValueError, match="optim: unknown field 'learnig_rate' \\(did you mean 'learning_rate'\\?\\)"):
    base.replace(optim={"learnig_rate": 0.1})
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.optim.learning_rate = 1.0


def test_set_and_set_path_reach_fields_and_nested_sections():
  c = Config().set(["optim.learning_rate=0.05", "data.image_size=64", "schedule.name=onecycle",
                    "schedule.pct_start=0.3", "run.length=3 epochs", "evaluation.bn_recompute=None"])
  assert (c.optim.learning_rate, c.data.image_size) == (0.05, 64)
  assert (c.schedule.name, c.schedule.pct_start) == ("onecycle", 0.3)
  assert c.run.length == "3 epochs" and c.evaluation.bn_recompute is None and c.validate()
  assert isinstance(Config().set(["optim.learning_rate=1"]).optim.learning_rate, float)  # int -> float field
  # A nested section that is off (None) starts from its defaults.
  m = Config().set(["optim.muon.momentum=0.6"]).optim.muon
  assert m == Muon(momentum=0.6)
  assert Config().set(["optim.muon={'learning_rate': 0.1}"]).optim.muon == Muon(learning_rate=0.1)
  assert Config().set(["init.pretrained.weights=w.npz"]).init.pretrained == Pretrained(weights="w.npz")
  assert Config().set_path("optim.lookahead.every", 3).optim.lookahead.every == 3
  assert Config(optim={"muon": {}}).set(["optim.muon=None"]).optim.muon is None
  # Tuples: a bare text is a 1-tuple, a list a tuple; a mean stays "pretrained".
  bare = Config().set(["optim.freeze=backbone", "augment.ops=flip", "data.data_dir=../shared/data/x",
                       "schedule.decay_at=['30 epochs', '60 epochs']", "data.mean=pretrained", "data.std=pretrained"])
  assert (bare.optim.freeze, bare.augment.ops, bare.data.data_dir) == (("backbone",), ("flip",), "../shared/data/x")
  assert bare.schedule.decay_at == ("30 epochs", "60 epochs") and bare.data.mean == bare.data.std == "pretrained"
  assert Config().set(["augment.ops=['flip', ('pad_crop', {'padding': 2})]"]).augment.ops == \
      ("flip", ("pad_crop", {"padding": 2}))
  with pytest.raises(ValueError, match="data.image_size must be int, got the text 'big'"):
    Config().set(["data.image_size=big"])
  with pytest.raises(ValueError, match="section.field=value"):
    Config().set(["oops"])


def test_did_you_mean_for_flat_names_and_misspelled_fields():
  for flat, dotted in (("learning_rate", "optim.learning_rate"), ("seed", "run.seed"), ("dtype", "model.dtype"),
                       ("label_smoothing", "augment.label_smoothing"), ("image_size", "data.image_size")):
    with pytest.raises(ValueError, match=f"unknown section '{flat}' \\(did you mean '{dotted}'\\?\\)"):
      Config().set([f"{flat}=1"])
  with pytest.raises(ValueError, match="unknown field 'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
    Config().set(["optim.learning_rat=0.1"])
  with pytest.raises(ValueError, match="unknown field 'momentun' \\(did you mean 'momentum'\\?\\)"):
    Config().set(["optim.muon.momentun=0.6"])
  with pytest.raises(ValueError, match="unknown section 'optm' \\(did you mean 'optim'\\?\\)"):
    Config().set(["optm.learning_rate=0.1"])
  with pytest.raises(ValueError, match="name a field of the section, e.g. schedule.name="):
    Config().set(["schedule=cosine"])
  with pytest.raises(ValueError, match="unknown field 'x'"):
    Config().set(["run.length.x=1"])


def test_one_table_per_optimizer_and_schedule():
  assert set(optim.OPTIMIZERS) == {"sgd", "adamw", "rmsprop", "lamb"}  # Muon is the optim.muon section
  assert set(optim.SCHEDULES) == {"cosine", "onecycle", "triangle", "linear", "step", "constant"}
  assert optim.OPTIMIZERS["adamw"][0] == ("b1", "b2", "eps")
  with pytest.raises(ValueError, match="optim.b1 is an option of adamw, lamb, not of optim.name='sgd'"):
    Config().set(["optim.b1=0.8"]).validate()
  with pytest.raises(ValueError, match="optim.momentum is an option of sgd, rmsprop, not of optim.name='adamw'"):
    Config(optim={"name": "adamw", "momentum": 0.5}).validate()
  with pytest.raises(ValueError, match="optim.rms_decay is an option of rmsprop"):
    Config(optim={"rms_decay": 0.5}).validate()
  with pytest.raises(ValueError, match="schedule.pct_start is an option of onecycle, triangle, not of "
                                       "schedule.name='cosine'"):
    Config(schedule={"pct_start": 0.3}).validate()
  with pytest.raises(ValueError, match="schedule.decay_at is an option of step"):
    Config(schedule={"decay_at": ("3 epochs",)}).validate()
  with pytest.raises(ValueError, match="schedule.name must be one of"):
    Config(schedule={"name": "poly"}).validate()
  # Options are flat on the section: changing the name keeps them, so another optimizer's are refused.
  c = Config().set(["optim.momentum=0.8", "schedule.name=onecycle", "schedule.pct_start=0.3"]).validate()
  assert (c.optim.momentum, c.schedule.pct_start) == (0.8, 0.3)
  with pytest.raises(ValueError, match="optim.momentum is an option of"):
    c.set(["optim.name=adamw"]).validate()
  assert Config().set(["optim.name=adamw", "optim.b1=0.8"]).validate().optim.b1 == 0.8
  assert MUON_TRIANGLE.validate() is MUON_TRIANGLE


def test_normalisation_and_label_smoothing_have_one_place():
  with pytest.raises(ValueError, match="mean/std"):
    Config(augment={"ops": (("normalize", {"mean": (0.5,) * 3, "std": (0.5,) * 3}),)}).validate()
  with pytest.raises(ValueError, match="label_smoothing"):
    Config(augment={"ops": ("flip", ("label_smoothing", {"epsilon": 0.1}))}).validate()


def test_durations_parse_check_and_resolve():
  assert durations.parse("8 epochs") == (8.0, "epochs")
  assert durations.parse("1 epoch") == (1.0, "epochs") and durations.parse("0.5 epochs") == (0.5, "epochs")
  assert durations.parse("200 steps") == (200.0, "steps") and durations.parse("1 step") == (1.0, "steps")
  assert durations.parse("10000 examples") == (10000.0, "examples")
  for bad in ("8", "epochs", "eight epochs", "8 hours", "-1 epochs", "inf epochs", "nan steps", "8 epochs x", 8, None):
    with pytest.raises(ValueError, match="a duration is"):
      durations.parse(bad)
  with pytest.raises(ValueError, match="run.length must be longer than 0"):
    Config(run={"length": "0 epochs"}).validate()
  Config(schedule={"warmup": "0 epochs"}).validate()  # a warmup may be 0
  with pytest.raises(ValueError, match="evaluation.every: a duration is"):
    Config(evaluation={"every": 1}).validate()
  with pytest.raises(ValueError, match="run.checkpoint_every: a duration is"):
    Config(run={"checkpoint_every": "100"}).validate()
  with pytest.raises(ValueError, match="phase 0: phase length: a duration is"):
    Config(run={"phases": (Phase(length="3 weeks"),)}).validate()
  assert durations.epochs_of("3 epochs") == 3.0 and durations.epochs_of("3 steps") is None
  assert durations.scaled("8 epochs", 3) == "3 epochs" and durations.scaled("200 steps", 50.0) == "50 steps"


def test_durations_steps_and_examples():
  steps = lambda d, spe=10, bs=128: durations.steps(d, steps_per_epoch=spe, batch_size=bs)
  assert steps("2 epochs") == 20 and steps("200 steps") == 200 and steps("1280 examples") == 10
  assert steps("0.25 epochs", spe=391) == 98  # 97.75: to the nearest step
  assert steps("0.34 epochs") == 3 and steps("0.36 epochs") == 4
  assert steps("1000 examples") == 8  # 7.8 steps of 128
  assert steps("10 examples") == 1 and steps("0.01 epochs") == 1  # a positive duration lasts a step
  assert steps("0 epochs") == 0 and steps("0 steps") == 0
  assert steps("2.6 steps") == 3
  ex = lambda d: durations.examples(d, steps_per_epoch=10, batch_size=128)
  assert ex("10000 examples") == 10000 and ex("3 steps") == 384 and ex("1 epochs") == 1280


def test_with_length_scales_phases():
  c = Config(run={"length": "20 epochs", "phases": (Phase(length="15 epochs", trainable="head"),
                                                   Phase(length="5 epochs", trainable=3, learning_rate=0.01))})
  short = c.with_length("8 epochs")
  assert [p.length for p in short.run.phases] == ["6 epochs", "2 epochs"] and short.run.length == "8 epochs"
  assert [p.trainable for p in short.run.phases] == ["head", 3] and short.run.phases[1].learning_rate == 0.01
  assert [p.length for p in c.with_length("3 epochs").run.phases] == ["2 epochs", "1 epochs"]  # 2.25 -> 2
  assert [p.length for p in c.with_length("1 epochs").run.phases] == ["1 epochs"]  # a phase of 0 epochs is dropped
  assert Config().with_length("4 epochs").run.length == "4 epochs"  # no phases: the run's length
  # A length in steps is a budget the phases share out in order: the phases stay as they are.
  budget = c.with_length("50 steps")
  assert budget.run.length == "50 steps" and budget.run.phases == c.run.phases
  stepped = c.replace(run={"phases": (Phase(length="30 steps"), Phase(length="10 steps"))})
  assert stepped.with_length("6 epochs").run.phases == stepped.run.phases  # phases in steps are not scaled


def test_phase_configs_inherit_and_override_sections():
  c = Config(optim={"learning_rate": 0.1}, init={"backbone_lr_multiplier": 0.2}, schedule={"warmup": "1 epochs"},
             run={"length": "50 steps", "phases": (Phase(length="15 epochs", trainable="head"),
                     Phase(length="5 epochs", trainable=3, learning_rate=0.01, backbone_lr_multiplier=0.5,
                           warmup="0 epochs"))})
  head, tune = c.phase_configs()
  assert (head.optim.learning_rate, head.init.trainable, head.run.length, head.run.phases) == (0.1, "head", "15 epochs", ())
  assert (head.init.backbone_lr_multiplier, head.schedule.warmup) == (0.2, "1 epochs")  # inherited
  assert (tune.optim.learning_rate, tune.init.trainable, tune.init.backbone_lr_multiplier) == (0.01, 3, 0.5)
  assert (tune.run.length, tune.schedule.warmup, tune.run.phases) == ("5 epochs", "0 epochs", ())
  assert head.data == tune.data == c.data and head.run.seed == c.run.seed
  assert Config().phase_configs() == [Config()]
  with pytest.raises(ValueError, match="phase 1"):
    c.replace(run={"phases": (Phase(length="1 epochs"), Phase(length="1 epochs", trainable="some"))}).validate()
  with pytest.raises(ValueError, match="phases: unknown field 'phases'"):  # only what a phase may change
    c.replace(run={"phases": ({"phases": ()},)})
  with pytest.raises(ValueError, match="phases: unknown field 'epochs'; fields: length, "):
    Config(run={"phases": ({"epochs": 15},)})
  # --set reaches a phase's field by its index.
  moved = c.set(['run.phases.0.length="2 epochs"', "run.phases.1.learning_rate=0.001"])
  assert [p.length for p in moved.run.phases] == ["2 epochs", "5 epochs"] and moved.run.phases[1].learning_rate == 0.001
  with pytest.raises(ValueError, match="phases.<index>.<field> with an index below 2"):
    c.set(["run.phases.2.length=1 epochs"])
  with pytest.raises(ValueError, match="phases.0: unknown field 'lenght' \\(did you mean 'length'\\?\\)"):
    c.set(["run.phases.0.lenght=1 epochs"])
