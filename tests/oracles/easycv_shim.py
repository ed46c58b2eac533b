"""Make pai-easycv 0.11.7 importable and runnable on CPU, with no side effects.

Test infrastructure only: the EasyCV oracle (``easycv_oracle.py``) calls :func:`install` before it
imports ``easycv`` or ``modelscope``. Left alone, EasyCV and ModelScope would

* run ``pip install cityscapesscripts`` while ``easycv.datasets`` is imported
  (``easycv/datasets/segmentation/data_sources/cityscapes.py``);
* run ``python setup.py build install`` inside the installed wheel to compile the
  ``MultiScaleDeformableAttention`` extension when the Mask2Former head is imported
  (``easycv/thirdparty/deformable_attention/functions/ms_deform_attn_func.py``);
* run ``pip install pai-easycv`` and ``pip wheel pai-easycv`` for the ``"plugins": ["pai-easycv"]`` key
  of the hub ``configuration.json`` (``modelscope.utils.plugins.register_plugins_repo``, called from
  ``pipeline()``, ``Model.from_pretrained`` and ``build_trainer``);
* import packages that have nothing to do with Mask2Former (COCO keypoints, nuScenes, OCR, ...);
* fail on ``import mmcv.ops``: mmcv 1.7.2 is installed without its compiled ``mmcv._ext``, and
  ``mmcv.ops.*`` load it at import time through ``mmcv.utils.ext_loader.load_ext``.

:func:`install` therefore

1. refuses, for the whole process, every subprocess or ``os.system`` call that runs pip or a
   ``setup.py`` (and sets ``PIP_REQUIRE_VIRTUALENV=1`` / ``PIP_NO_INDEX=1`` for any pip that slips
   through another way);
2. puts stand-in modules for the compiled extension and the unrelated packages in ``sys.modules``
   (through a meta-path finder, so their submodules import too). Touching anything in a stand-in
   other than importing it raises, so a stand-in can never silently change a result;
3. installs ``mmcv_shim`` (beside this file): ``mmcv.utils.ext_loader.load_ext`` returns a stand-in
   extension whose kernels raise when called (Mask2Former on CPU calls none of them);
4. replaces ModelScope's ``register_plugins_repo`` with a function that imports EasyCV's own
   ModelScope integration (``easycv.toolkit.modelscope``), which registers the
   ``r50-panoptic-segmentation`` model and the ``image-panoptic-segmentation-easycv`` pipeline, and
   installs nothing.

The stand-in for ``MultiScaleDeformableAttention`` raises from ``ms_deform_attn_forward``; EasyCV's
``MSDeformAttn.forward`` catches that (bare ``except``) and takes its pure-PyTorch path
``ms_deform_attn_core_pytorch`` (``F.grid_sample``), which is what runs on CPU.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import re
import shlex
import subprocess
import sys
import types
from typing import Sequence

# Top-level modules replaced by stand-ins. None of them is used by Mask2Former inference.
STUB_TOP_LEVEL_MODULES = (
    'MultiScaleDeformableAttention',  # EasyCV's compiled deformable-attention extension
    'cityscapesscripts',  # Cityscapes data source (its import runs pip install)
    'xtcocotools',  # COCO whole-body keypoints
    'nuscenes',  # 3D detection data
    'pyquaternion',  # 3D detection data
    'imgaug',  # OCR augmentations
    'shapely',  # OCR post-processing
    'pyclipper',  # OCR post-processing
    'lmdb',  # OCR data sources
    'rapidfuzz',  # OCR metrics
    'skimage',  # scikit-image: pose / OCR utilities
    'wget',  # dataset download helpers
)

# The modules in ModelScope that imported ``register_plugins_repo`` by name.
_PLUGIN_REGISTRATION_SITES = (
    'modelscope.utils.plugins',
    'modelscope.pipelines.builder',
    'modelscope.models.base.base_model',
    'modelscope.trainers.builder',
)

# "pip", "pip3", "pip3.11", "-m pip", "setup.py" anywhere in a command line.
_BLOCKED_COMMAND = re.compile(r'(^|[\s/\'";&|])pip[0-9.]*($|[\s\'";&|])|setup\.py')

_installed = False
refused_commands: list[str] = []  # every command refused so far, for the caller to report


class BlockedCommandError(RuntimeError):
    """Raised instead of running pip or setup.py in a subprocess."""


def _command_text(args) -> str:
    if isinstance(args, (str, bytes, os.PathLike)):
        return os.fsdecode(args)
    return ' '.join(shlex.quote(os.fsdecode(a)) for a in args)


def _refuse_if_blocked(args) -> None:
    text = _command_text(args)
    if _BLOCKED_COMMAND.search(text):
        refused_commands.append(text)
        raise BlockedCommandError(f'easycv_shim refused to run {text!r}: pip and setup.py are blocked in the oracle')


class _GuardedPopen(subprocess.Popen):
    """``subprocess.Popen`` that refuses pip / setup.py (covers call, run, check_output, ...)."""

    def __init__(self, args, *rest, **kwargs):
        _refuse_if_blocked(args)
        super().__init__(args, *rest, **kwargs)


def _block_package_installs() -> None:
    os.environ['PIP_REQUIRE_VIRTUALENV'] = '1'
    os.environ['PIP_NO_INDEX'] = '1'
    subprocess.Popen = _GuardedPopen
    original_system = os.system

    def guarded_system(command):
        _refuse_if_blocked(command)
        return original_system(command)

    os.system = guarded_system


class _StubAttribute:
    """What any attribute of a stand-in module resolves to: unusable by construction."""

    def __init__(self, qualified_name: str):
        self._qualified_name = qualified_name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f'{self._qualified_name} is a stand-in from tests/oracles/easycv_shim.py')

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return _StubAttribute(f'{self._qualified_name}.{name}')

    def __mro_entries__(self, bases):
        # Lets ``class X(stub.Base)`` at import time succeed; instantiating X still works like object.
        return (object,)


def _make_stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__doc__ = 'Stand-in module installed by tests/oracles/easycv_shim.py.'
    module.__path__ = []  # a package, so that "import name.sub" goes back to the finder

    def module_getattr(attribute):
        if attribute.startswith('__'):
            raise AttributeError(attribute)
        return _StubAttribute(f'{name}.{attribute}')

    module.__getattr__ = module_getattr
    if name == 'MultiScaleDeformableAttention':

        def ms_deform_attn_forward(*args, **kwargs):
            # EasyCV's MSDeformAttn.forward catches this and uses ms_deform_attn_core_pytorch.
            raise NotImplementedError('compiled MultiScaleDeformableAttention is not available in the oracle')

        module.ms_deform_attn_forward = ms_deform_attn_forward
        module.ms_deform_attn_backward = ms_deform_attn_forward
    return module


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves stand-in modules for STUB_TOP_LEVEL_MODULES and all their submodules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split('.', 1)[0] in STUB_TOP_LEVEL_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _make_stub_module(spec.name)

    def exec_module(self, module):
        pass


def _install_stub_modules() -> None:
    if not any(isinstance(finder, _StubFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())


def _stub_mmcv_extension() -> None:
    """mmcv.ops without compiled kernels: the shared stand-in in tests/oracles/mmcv_shim.py."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import mmcv_shim

    mmcv_shim.install()


def import_easycv_modelscope_integration() -> None:
    """Import EasyCV's ModelScope models/pipelines so their registry decorators run."""
    importlib.import_module('easycv.toolkit.modelscope')
    importlib.import_module('easycv.toolkit.modelscope.models.image_panoptic_segmentation.r50_panseg_model')
    importlib.import_module('easycv.toolkit.modelscope.pipelines.image_panoptic_segmentation_pipeline')


def _register_plugins_repo_without_pip(plugins: Sequence[str] | None) -> None:
    """Stand-in for modelscope.utils.plugins.register_plugins_repo: no pip, no network."""
    for plugin in plugins or ():
        if plugin != 'pai-easycv':
            raise BlockedCommandError(f'easycv_shim only knows the pai-easycv plugin, not {plugin!r}')
    if plugins:
        import_easycv_modelscope_integration()


def _neutralise_modelscope_plugins() -> None:
    for module_name in _PLUGIN_REGISTRATION_SITES:
        module = importlib.import_module(module_name)
        if hasattr(module, 'register_plugins_repo'):
            module.register_plugins_repo = _register_plugins_repo_without_pip


def install() -> None:
    """Apply everything above; idempotent. Call before importing easycv or modelscope pipelines."""
    global _installed
    if _installed:
        return
    _block_package_installs()
    _install_stub_modules()
    _stub_mmcv_extension()
    _neutralise_modelscope_plugins()
    import_easycv_modelscope_integration()
    _installed = True
