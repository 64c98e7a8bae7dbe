"""One meaning per public name, and the old names still importable where they were."""

import warnings

import pytest

import map_merge as mm
from map_merge import errors


def test_recipe_means_the_job_an_executor_runs():
    from map_merge.executors import Recipe

    assert mm.Recipe is Recipe
    assert Recipe(lambda base, parts, item: base + item, 2)(3) == 5  # run(base, parts, item)


def test_from_mergekit_gives_a_mergekit_recipe():
    recipe = mm.from_mergekit({"merge_method": "task_arithmetic", "base_model": "/models/base",
                               "models": [{"model": "/models/a", "parameters": {"weight": 0.5}}]})
    assert type(recipe) is mm.MergekitRecipe
    assert recipe.models == {"a": "/models/a"} and recipe.flat_coeffs.tolist() == [0.5]


@pytest.mark.parametrize("module, old, new", [("map_merge.mergekit_config", "Recipe", "MergekitRecipe"),
                                              ("map_merge.zoo.lm", "LMRecipe", "LMZooSettings")])
def test_renamed_classes_keep_their_old_name_with_a_deprecation_warning(module, old, new):
    import importlib

    namespace = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(namespace, old) is getattr(namespace, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(namespace, new)  # the new name warns nothing
    with pytest.raises(AttributeError):
        getattr(namespace, "NoSuchName")


def test_shared_exceptions_live_in_errors_and_where_they_were():
    from map_merge import config, config_read, executors, mergekit_config
    from map_merge.task_vectors import checkfile

    assert mergekit_config.RecipeError is errors.RecipeError
    assert config.ConfigError is config_read.ConfigError is errors.ConfigError
    assert checkfile.CheckpointFileError is errors.CheckpointFileError
    assert mm.EvaluationError is executors.EvaluationError is errors.EvaluationError
    assert mm.WorkerError is executors.WorkerError is errors.WorkerError
    assert all(issubclass(e, ValueError) for e in (errors.RecipeError, errors.ConfigError, errors.CheckpointFileError))
