"""Model cards (``model_cards/<owner>/<name>/``): validation against what this package loads, and publishing.

A card folder holds ``README.md`` (ModelScope's card format: YAML front matter, then usage, preprocessing,
metrics, limitations, citation) and ``configuration.json``; a model directory with weights can sit beside it.
``publish_folder`` assembles exactly what ``push_card`` uploads: the card's README, the configuration (from the
weights directory if it has one, else the card's) with this package named in ``plugins`` (so ModelScope
pip-installs and imports it for whoever loads the model; ``pai-easycv`` is dropped, this package replaces it),
and the weight files.
"""
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import yaml

from modelscope_plugin.errors import CardError

PACKAGE_NAME = "modelscope-plugin-seg"
"""This package's distribution name (setup.cfg), as ``plugins`` names it."""
TOKEN_VARIABLE = "MODELSCOPE_API_TOKEN"
REQUIRED_FRONT_MATTER = ("tasks", "frameworks", "license", "datasets", "metrics")
TASK = "image-segmentation"
CARD_FILES = ("README.md", "configuration.json")
WEIGHT_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".safetensors", ".py", ".json")


def read_card_text(path: Path) -> str:
    """A card file's text; a missing file or one that is not UTF-8 is a ``CardError`` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise CardError(f"{path} does not exist") from error
    except UnicodeDecodeError as error:
        raise CardError(f"{path} is not UTF-8 text: {error}") from error


def read_front_matter(readme: Path) -> Dict[str, Any]:
    """The YAML block between the first two ``---`` lines of a card README."""
    text = read_card_text(readme)
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, flags=re.DOTALL)
    if not match:
        raise CardError(f"{readme} has no front matter (a YAML block between '---' lines at the top)")
    try:
        values = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise CardError(f"{readme}: front matter is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise CardError(f"{readme}: front matter must be a mapping, not {type(values).__name__}")
    return values


def python_examples(readme: Path) -> List[str]:
    """The card's ```python code blocks, in order."""
    return re.findall(r"```python\n(.*?)```", read_card_text(readme), flags=re.DOTALL)


def _front_matter_problems(values: Dict[str, Any]) -> List[str]:
    problems = [f"front matter lacks '{field}'" for field in REQUIRED_FRONT_MATTER if not values.get(field)]
    if values.get("tasks") and TASK not in values["tasks"]:
        problems.append(f"front matter tasks {values['tasks']} do not include '{TASK}'")
    if values.get("frameworks") and "pytorch" not in values["frameworks"]:
        problems.append(f"front matter frameworks {values['frameworks']} do not include 'pytorch'")
    datasets = values.get("datasets")
    if datasets and not (isinstance(datasets, dict) and all(isinstance(names, list) for names in datasets.values())):
        problems.append("front matter datasets must map 'train' / 'evaluation' to lists of dataset names")
    metrics = values.get("metrics")
    if metrics and not isinstance(metrics, list):
        problems.append("front matter metrics must be a list of metric names")
    return problems


def _registered_by_this_package(registry, type_name: Optional[str]) -> bool:
    from modelscope.utils.constant import Tasks

    import modelscope_plugin  # noqa: F401  (registers)

    try:
        registered = registry.get(type_name, Tasks.image_segmentation)
    except KeyError:
        return False
    return registered is not None and registered.__module__.startswith("modelscope_plugin")


def configuration_problems(configuration: Dict[str, Any]) -> List[str]:
    """configuration.json fields ModelScope needs, checked against the types this package registered."""
    from modelscope.models.builder import MODELS
    from modelscope.pipelines.builder import PIPELINES

    from modelscope_plugin.integration.hub import REPLACED_PLUGINS

    if not isinstance(configuration, dict):
        return [f"configuration.json must hold a JSON object, not {type(configuration).__name__}"]
    problems = [f"configuration.json {name} must be {kind}, not {type(configuration[name]).__name__}"
                for name, kind, expected in (("model", "an object", dict), ("pipeline", "an object", dict),
                                             ("plugins", "a list", list))
                if configuration.get(name) is not None and not isinstance(configuration[name], expected)]
    if problems:
        return problems
    if configuration.get("framework") != "pytorch":
        problems.append(f"configuration.json framework is {configuration.get('framework')!r}, not 'pytorch'")
    if configuration.get("task") != TASK:
        problems.append(f"configuration.json task is {configuration.get('task')!r}, not '{TASK}'")
    model_type = (configuration.get("model") or {}).get("type")
    if not _registered_by_this_package(MODELS, model_type):
        problems.append(f"configuration.json model.type {model_type!r} is not a model type modelscope_plugin registers")
    pipeline_type = (configuration.get("pipeline") or {}).get("type")
    if not _registered_by_this_package(PIPELINES, pipeline_type):
        problems.append(f"configuration.json pipeline.type {pipeline_type!r} "
                        "is not a pipeline modelscope_plugin registers")
    unknown_plugins = [plugin for plugin in configuration.get("plugins") or []
                       if plugin not in REPLACED_PLUGINS]
    if unknown_plugins:
        problems.append(f"configuration.json plugins {unknown_plugins} would be pip-installed by ModelScope")
    return problems


def _read_configuration(path: Path) -> Dict[str, Any]:
    text = read_card_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CardError(f"{path} is not valid JSON: {error}") from error


def has_weights(directory: Path) -> bool:
    return any(path.suffix in (".pt", ".pth", ".pkl", ".safetensors") for path in directory.iterdir() if path.is_file())


def validate_card(card_dir, model_dir=None) -> List[str]:
    """Every problem of a card (empty list: valid). With weights in ``model_dir`` (or in the card folder) the model
    is also built and loaded strictly, so the card describes something this package can run."""
    card_dir = Path(card_dir)
    if not card_dir.is_dir():
        return [f"card folder {card_dir} does not exist"]
    problems: List[str] = []
    for check in (lambda: _front_matter_problems(read_front_matter(card_dir / "README.md")),
                  lambda: configuration_problems(_read_configuration(card_dir / "configuration.json"))):
        try:
            problems += check()
        except CardError as error:
            problems.append(str(error))
    if (card_dir / "README.md").is_file():
        try:
            if not python_examples(card_dir / "README.md"):
                problems.append(f"{card_dir / 'README.md'} has no ```python usage example")
        except CardError as error:
            if str(error) not in problems:
                problems.append(str(error))
    weights_dir = Path(model_dir) if model_dir else card_dir
    if model_dir or has_weights(card_dir):
        problems += _loading_problems(weights_dir)
    return problems


def _loading_problems(model_dir: Path) -> List[str]:
    from modelscope_plugin.errors import CheckpointError, ModelDirError
    from modelscope_plugin.model_dirs.load import load_model

    try:
        load_model(model_dir)
    except (CheckpointError, ModelDirError) as error:
        return [f"{model_dir} does not load: {error}"]
    return []


def published_configuration(configuration: Dict[str, Any]) -> Dict[str, Any]:
    """The configuration with this package in ``plugins`` (and the plugins it replaces removed)."""
    from modelscope_plugin.integration.hub import REPLACED_PLUGINS

    plugins = [plugin for plugin in configuration.get("plugins") or [] if plugin not in REPLACED_PLUGINS]
    return {**configuration, "plugins": [PACKAGE_NAME] + plugins}


def publish_folder(card_dir, model_dir, destination, model_id: str) -> Path:
    """Writes the exact folder ``push_card`` uploads for ``model_id``; refuses an existing ``destination``."""
    card_dir, model_dir, destination = Path(card_dir), Path(model_dir), Path(destination)
    if destination.exists():
        raise CardError(f"{destination} already exists; choose a new folder (nothing was overwritten)")
    check_model_id(model_id)
    problems = validate_card(card_dir, model_dir)
    if problems:
        raise CardError(f"card {card_dir} is not valid:\n  " + "\n  ".join(problems))
    configuration_source = model_dir / "configuration.json" if (model_dir / "configuration.json").is_file() \
        else card_dir / "configuration.json"
    configuration = published_configuration(_read_configuration(configuration_source))
    destination.mkdir(parents=True)
    readme = read_card_text(card_dir / "README.md")
    # the examples load the published copy (either owner spelling of the card's own id)
    for owner in ("damo", "iic", card_dir.parent.name):
        readme = readme.replace(f"{owner}/{card_dir.name}", model_id)
    (destination / "README.md").write_text(readme, encoding="utf-8")
    (destination / "configuration.json").write_text(json.dumps(configuration, indent=2) + "\n", encoding="utf-8")
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in CARD_FILES and path.suffix in WEIGHT_SUFFIXES:
            shutil.copy2(path, destination / path.name)
    return destination


def check_model_id(model_id: str) -> Tuple[str, str]:
    owner, _, name = model_id.partition("/")
    if not owner or not name or "/" in name:
        raise CardError(f"model id {model_id!r} must be '<your namespace>/<name>'")
    from modelscope_plugin.integration.hub import SUPPORTED_OWNERS

    if owner in SUPPORTED_OWNERS:
        raise CardError(f"refusing to publish under {owner!r}: push to your own namespace")
    return owner, name


def check_hub_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """Fails at once (one TCP connect, ``timeout`` seconds at most) when the hub cannot be reached."""
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise CardError(f"cannot reach the ModelScope hub at {endpoint} ({error}); card push needs network access. "
                        "Use --dry-run FOLDER to write what would be uploaded.") from error


def push_card(card_dir, model_dir, model_id: str, staging_dir, private: bool = True) -> str:
    """Publishes card + weights as ``model_id`` (under the token owner's namespace) with ModelScope's ``HubApi``.
    The token comes from ``MODELSCOPE_API_TOKEN``. Returns the model's URL."""
    from modelscope.hub.api import HubApi

    owner, _ = check_model_id(model_id)
    token = os.environ.get(TOKEN_VARIABLE)
    if not token:
        raise CardError(f"set {TOKEN_VARIABLE} to a ModelScope access token to push {model_id}")
    api = HubApi()
    check_hub_reachable(api.endpoint)
    folder = publish_folder(card_dir, model_dir, Path(staging_dir) / model_id.replace("/", "--"), model_id)
    api.login(token)
    username = HubApi.get_user_info()[0]
    if username and username != owner:
        raise CardError(f"the token belongs to {username!r}; push to {username}/<name>, not {model_id}")
    license_name = read_front_matter(folder / "README.md").get("license")
    if not api.repo_exists(model_id):
        api.create_model(model_id, visibility=1 if private else 5, license=license_name)
    api.upload_folder(repo_id=model_id, folder_path=str(folder),
                      commit_message=f"Publish {model_id} with {PACKAGE_NAME}")
    return api.get_model_url(model_id)
