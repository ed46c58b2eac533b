"""Hub-id resolution: the supported ``damo/`` / ``iic/`` ids resolve to the local ModelScope cache first.

ModelScope's ``pipeline()`` and ``Model.from_pretrained`` ask the hub about an id even when the model is cached,
and pip-install the r50 card's ``plugins: ["pai-easycv"]``. The functions here are installed into
``modelscope.pipelines.builder``, the trainer builder and ``Model.from_pretrained`` by ``registry.install()``, so
that for this package's ids:
- a cached id resolves with no network call (``snapshot_download(..., local_files_only=True)``);
- an uncached id downloads through ModelScope's own client, or fails at once naming the id, the cache
  path and how to place the files by hand;
- ``pai-easycv`` is not pip-installed for the model types this package runs (it runs them itself); other models
  that list it (EasyCV's own) keep it.
"""
import functools
import os
from pathlib import Path
from typing import Optional

from modelscope_plugin.errors import ModelNotAvailableError
from modelscope_plugin.model_dirs.configuration import MODEL_TYPES, read_configuration_json, synthesized_configuration

SUPPORTED_MODEL_NAMES = (
    "cv_swinL_panoptic-segmentation_cocopan",
    "cv_swinL_semantic-segmentation_cocopanmerge",
    "cv_r50_panoptic-segmentation_cocopan",
    "cv_resnet50_fast-instance-segmentation_coco",
)
SUPPORTED_OWNERS = ("damo", "iic")
# pai-easycv: this package runs the models of its own types (MODEL_TYPES) itself; modelscope-plugin-seg: published
# cards name this package, which is already imported whenever these wrappers run
REPLACED_PLUGINS = {"pai-easycv", "modelscope-plugin-seg"}
THIS_PACKAGE_PLUGINS = {"modelscope-plugin-seg"}


def plugins_kept(plugins, model_type) -> list:
    """A configuration's ``plugins`` less those this package replaces for ``model_type``: pai-easycv only for the
    model types it runs, itself for any."""
    replaced = REPLACED_PLUGINS if model_type in MODEL_TYPES else THIS_PACKAGE_PLUGINS
    return [plugin for plugin in plugins or [] if plugin not in replaced]


def is_supported_id(model) -> bool:
    if not isinstance(model, str) or os.path.isdir(model) or model.count("/") != 1:
        return False
    owner, name = model.split("/")
    return owner in SUPPORTED_OWNERS and name in SUPPORTED_MODEL_NAMES


def cache_root() -> Path:
    return Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope"))


@functools.lru_cache(maxsize=None)
def resolve_model_dir(model_id: str, revision: Optional[str] = None) -> str:
    """Local directory of a supported id: the cache (either owner spelling), else a download, else an error."""
    from modelscope.hub.snapshot_download import snapshot_download

    owner, name = model_id.split("/")
    revision = revision or "master"
    for candidate_owner in (owner,) + tuple(other for other in SUPPORTED_OWNERS if other != owner):
        try:
            local = snapshot_download(f"{candidate_owner}/{name}", revision=revision, local_files_only=True)
        except Exception:  # modelscope raises ValueError/FileNotFoundError flavours for "not cached"
            continue
        if local and Path(local, "configuration.json").is_file():
            return str(local)
    try:
        return str(snapshot_download(model_id, revision=revision))
    except Exception as error:
        expected = cache_root() / "models" / f"{owner}--{name}" / "snapshots" / revision
        raise ModelNotAvailableError(
            f"{model_id} (revision {revision}) is not in the local ModelScope cache and could not be downloaded "
            f"({type(error).__name__}: {error}). Cache searched: {cache_root()}. To install it by hand, place the "
            f"model files (configuration.json and the weights) in {expected}, or pass that directory as model=."
        ) from error


def wrap_is_model_from_trusted_source(original):
    def is_model_from_trusted_source(model, revision=None, *args, **kwargs):
        if is_supported_id(model):
            return True  # damo/iic are ModelScope's trusted owners; no need to ask the hub
        return original(model, revision, *args, **kwargs)

    return is_model_from_trusted_source


def wrap_is_official_hub_path(original):
    def is_official_hub_path(path, revision=None, *args, **kwargs):
        if is_supported_id(path):
            resolve_model_dir(path, revision)
            return True
        if isinstance(path, (str, Path)) and synthesized_configuration(path) is not None:
            return True
        if (isinstance(path, (str, Path)) and os.path.isdir(path)
                and not any(os.path.isfile(os.path.join(path, name))
                            for name in ("configuration.json", "config.json"))):
            # neither ModelScope's nor a transformers config: ModelScope's builder would go on to a TypeError
            # ('NoneType' object does not support item assignment); one ModelDirError naming the directory instead
            read_configuration_json(Path(path))
        return original(path, revision, *args, **kwargs)

    return is_official_hub_path


def wrap_read_config(original):
    def read_config(model_id_or_path, revision=None, *args, **kwargs):
        if isinstance(model_id_or_path, (str, Path)):
            synthesized = synthesized_configuration(model_id_or_path)
            if synthesized is not None:
                from modelscope.utils.config import Config

                return Config(synthesized)
        if is_supported_id(model_id_or_path):
            model_id_or_path = resolve_model_dir(model_id_or_path, revision)
        elif isinstance(model_id_or_path, (str, Path)) and os.path.isdir(model_id_or_path):
            # a local directory without a readable configuration.json: one clear ModelDirError naming it and the
            # reason, instead of the TypeError / JSONDecodeError ModelScope's builder would raise
            read_configuration_json(Path(model_id_or_path))
        config = original(model_id_or_path, revision, *args, **kwargs)
        plugins = config.safe_get("plugins") if config is not None else None
        if plugins:
            config.plugins = plugins_kept(plugins, config.safe_get("model.type"))
        return config

    return read_config


def wrap_normalize_model_input(original):
    def normalize_model_input(model, model_revision, *args, **kwargs):
        if is_supported_id(model):
            return resolve_model_dir(model, model_revision)
        return original(model, model_revision, *args, **kwargs)

    return normalize_model_input


def wrap_from_pretrained(original):
    """``Model.from_pretrained`` (its function) -> a classmethod that hands it the local directory of a supported id,
    and the configuration ``load_model`` stands for of a checkpoint without configuration.json."""
    def from_pretrained(cls, model_name_or_path, revision=None, *args, **kwargs):
        if is_supported_id(model_name_or_path):
            model_name_or_path = resolve_model_dir(model_name_or_path, revision)
        elif isinstance(model_name_or_path, (str, Path)) and not args and kwargs.get("cfg_dict") is None:
            synthesized = synthesized_configuration(model_name_or_path)
            if synthesized is not None:  # a checkpoint without configuration.json (HF folder, single file)
                from modelscope.utils.config import Config

                kwargs["cfg_dict"] = Config(synthesized)
        if revision is None:
            return original(cls, model_name_or_path, *args, **kwargs)
        return original(cls, model_name_or_path, revision, *args, **kwargs)

    return classmethod(functools.wraps(original)(from_pretrained))


def wrap_register_plugins_repo(original):
    """Drops this package from the plugins to install (it is imported already). pai-easycv is dropped before this
    point, where the model type is known: by ``read_config`` (pipelines, trainers) and, for ``Model.from_pretrained``,
    by counting this package's model types among ModelScope's config-only models (``configured_models``)."""
    def register_plugins_repo(plugins):
        remaining = [plugin for plugin in (plugins or []) if plugin not in THIS_PACKAGE_PLUGINS]
        return original(remaining) if remaining else None

    return register_plugins_repo


def configured_models(original: frozenset) -> frozenset:
    """ModelScope's ``_CONFIG_ONLY_MODELS`` (model types whose ``plugins`` ``Model.from_pretrained`` ignores) with
    this package's model types."""
    return frozenset(original) | frozenset(MODEL_TYPES)
