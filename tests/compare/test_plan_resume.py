"""A comparison folder's plan.json keeps resuming when a release adds TrainConfig fields (their defaults
fill in), and still refuses a changed recipe."""
import dataclasses
import json

import pytest

from softmoe.compare.runner import PLAN, check_plan
from softmoe.train import TrainConfig


def _plan(**recipe_changes):
    recipe = {k: v for k, v in dataclasses.replace(TrainConfig(), **recipe_changes).to_dict().items()
              if k not in ("model", "seed", "workdir")}
    return {"data": "digits", "recipe": recipe, "seeds": [0]}


def test_a_plan_without_newer_fields_resumes(tmp_path):
    plan = _plan(lr=3e-3)
    old = json.loads(json.dumps(plan))
    del old["recipe"]["data_parallel"], old["recipe"]["checkpoint_timeout_s"]  # as an older release wrote it
    (tmp_path / PLAN).write_text(json.dumps(old))
    check_plan(tmp_path, plan)  # no error: the missing fields read as their defaults
    assert json.loads((tmp_path / PLAN).read_text()) == old  # the same plan: nothing to rewrite
    plan["seeds"] = [0, 1]  # an extension rewrites it, now with every field
    check_plan(tmp_path, plan)
    assert json.loads((tmp_path / PLAN).read_text()) == plan


def test_a_changed_recipe_is_refused(tmp_path):
    check_plan(tmp_path, _plan(lr=3e-3))
    with pytest.raises(ValueError, match="its plan differs in: recipe"):
        check_plan(tmp_path, _plan(lr=1e-3))
    old = json.loads((tmp_path / PLAN).read_text())
    del old["recipe"]["data_parallel"]
    old["recipe"]["lr"] = 1e-2  # a missing field does not hide a changed one
    (tmp_path / PLAN).write_text(json.dumps(old))
    with pytest.raises(ValueError, match="recipe"):
        check_plan(tmp_path, _plan(lr=3e-3))
