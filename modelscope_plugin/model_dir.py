"""Kept for scripts written against earlier releases: ``modelscope_plugin.model_dir.load_model`` and friends now
live in ``modelscope_plugin.model_dirs``."""
from modelscope_plugin.errors import ModelDirError
from modelscope_plugin.model_dirs.configuration import MODEL_TYPES, read_configuration_json
from modelscope_plugin.model_dirs.load import load_model, load_model_dir

__all__ = ["MODEL_TYPES", "ModelDirError", "load_model", "load_model_dir", "read_configuration_json"]
