"""``build_trainer('easycv', ...)``: the r50 card's recipe, run by this package's trainer.

    import modelscope_plugin
    from modelscope.msdatasets import MsDataset
    from modelscope.trainers import build_trainer

    trainer = build_trainer('easycv', dict(
        model='damo/cv_r50_panoptic-segmentation_cocopan',
        train_dataset=MsDataset.load('COCO2017_panopic_subset', namespace='modelscope', split='train'),
        eval_dataset=MsDataset.load('COCO2017_panopic_subset', namespace='modelscope', split='validation'),
        work_dir='work', cfg_options={'train.max_epochs': 2}))
    trainer.train()

The name ``easycv`` goes to ``EasyCVRecipeTrainer`` for the model types this package runs (a model directory whose
``configuration.json`` names one, or a supported hub id); any other model goes to EasyCV's own
``EasyCVEpochBasedTrainer`` where pai-easycv is installed, and fails naming the model and pai-easycv where it is not.

``EasyCVRecipeTrainer`` is ``SegmentationTrainer`` reading the EasyCV-written sections of ``configuration.json``
(``integration/easycv_recipe.py`` has the table of every key: mapped, or ignored with a logged note; anything else
is one ``TrainingConfigError`` when the trainer is built). The training categories are the panoptic annotation
file's (a class set unlike the model's re-initialises the class head, logged). ``paramwise_options`` patterns match
EasyCV's parameter names (``head.pixel_decoder.*``, ``head.predictor.*``, ``backbone.*``).
"""
import os
from pathlib import Path
from typing import Any

from modelscope.trainers.builder import TRAINERS
from modelscope.trainers.hooks.builder import HOOKS
from modelscope.utils.import_utils import LazyImportModule
from modelscope.utils.registry import default_group

from modelscope_plugin.errors import TrainingConfigError
from modelscope_plugin.integration import hub
from modelscope_plugin.integration.easycv_recipe import EasyCVRecipe, read_easycv_recipe
from modelscope_plugin.integration.trainer import SegmentationTrainer
from modelscope_plugin.model_dirs.configuration import MODEL_TYPES, read_configuration_json, synthesized_configuration

TRAINER_NAME = "easycv"
# this package's parameter names -> EasyCV's (the inverse of checkpoints.keymaps.EASYCV_RULES)
EASYCV_NAME_PREFIXES = (("pixel_decoder.", "head.pixel_decoder."), ("transformer_decoder.", "head.predictor."))


def modelscope_knows_hook(name: str) -> bool:
    """Whether ModelScope registers (or lazily imports) a hook of this name."""
    index = LazyImportModule.get_ast_index()["index"]
    return name in HOOKS.modules.get(default_group, {}) or ("HOOKS", default_group, name) in index


def easycv_parameter_name(name: str) -> str:
    for native, easycv in EASYCV_NAME_PREFIXES:
        if name.startswith(native):
            return easycv + name[len(native):]
    return name


class EasyCVRecipeTrainer(SegmentationTrainer):
    """``SegmentationTrainer`` over a configuration whose training sections EasyCV wrote (see the module
    docstring)."""

    def read_training_sections(self, cfg):
        recipe = read_easycv_recipe(cfg.to_dict(), known_hook=modelscope_knows_hook)
        cfg["train"] = recipe.train
        cfg["evaluation"] = recipe.evaluation
        if recipe.datasets:
            cfg["dataset"] = recipe.datasets
        self.recipe: EasyCVRecipe = recipe
        self._notes.extend(recipe.notes)
        return cfg

    def parameter_name(self, name: str) -> str:
        return easycv_parameter_name(name)

    def build_model(self):
        network = super().build_model()
        config, recipe = self.model_config, self.recipe
        stages = getattr(config, "decoder_layers", None)
        if recipe.decoder_stages is not None and stages is not None and recipe.decoder_stages != stages + 1:
            raise TrainingConfigError(f"model.train_cfg.dec_layers {recipe.decoder_stages} is not the network's "
                                      f"{stages} decoder layers + 1 (the predictions deep supervision covers)")
        if recipe.normalize is not None:
            mean, std = recipe.normalize
            if (tuple(mean), tuple(std)) != (tuple(config.preprocess.mean), tuple(config.preprocess.std)):
                raise TrainingConfigError(f"dataset.train.pipeline MMNormalize (mean {list(mean)}, std {list(std)}) "
                                          f"differs from the model's (mean {list(config.preprocess.mean)}, std "
                                          f"{list(config.preprocess.std)}, from dataset.val.pipeline); training "
                                          "normalises as the model does at test time")
        return network

    def get_metrics(self):
        metrics = super().get_metrics()
        names = [category.name for category in self.categories]
        thing_names = [category.name for category in self.categories if category.isthing]
        for evaluator, classes in self.recipe.evaluator_classes.items():
            expected = names if evaluator == "CocoPanopticEvaluator" else thing_names
            if list(classes) != expected:
                self._notes.append(f"evaluation.metrics {evaluator} classes ({len(classes)} names) differ from the "
                                   f"training categories ({len(expected)}: {', '.join(expected[:5])}...); the "
                                   "training categories are scored")
        return metrics


def _model_type(model: Any):
    """The ``configuration.json`` model type of a model directory, that of a supported hub id, else None."""
    if isinstance(model, (str, Path)) and os.path.isdir(model):
        configuration = synthesized_configuration(model) or read_configuration_json(Path(model))
        return (configuration.get("model") or {}).get("type")
    if hub.is_supported_id(model):
        return read_configuration_json(Path(hub.resolve_model_dir(model)))["model"]["type"]
    return None


def easycv_trainer_class():
    """EasyCV's ``EasyCVEpochBasedTrainer``; importing its module registers it as ``easycv`` too, so this package's
    entry steps aside while it is imported and keeps the name afterwards (it is the one that dispatches)."""
    group = TRAINERS.modules.setdefault(default_group, {})
    ours = group.pop(TRAINER_NAME, None)
    try:
        from easycv.toolkit.modelscope.trainers.trainer import EasyCVEpochBasedTrainer
    finally:
        if ours is not None:
            group[TRAINER_NAME] = ours
    return EasyCVEpochBasedTrainer


def build_easycv_trainer(model: Any = None, **kwargs: Any):
    """``build_trainer('easycv', kwargs)``: this package's trainer for its model types, EasyCV's for the others."""
    model_type = _model_type(model)
    if model_type in MODEL_TYPES:
        return EasyCVRecipeTrainer(model=model, **kwargs)
    try:
        trainer_class = easycv_trainer_class()
    except ImportError as error:
        raise TrainingConfigError(
            f"build_trainer('easycv') for model {model!r} (model type {model_type!r}): this package trains the model "
            f"types {sorted(MODEL_TYPES)}; any other needs EasyCV's trainer from pai-easycv, which cannot be "
            f"imported ({type(error).__name__}: {error})") from error
    return trainer_class(model=model, **kwargs)


TRAINERS.register_module(module_name=TRAINER_NAME, module_cls=build_easycv_trainer, force=True)
