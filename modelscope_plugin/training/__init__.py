"""Finetuning Mask2Former with ModelScope's trainer: data and augmentation, parameter groups, checkpoints that
resume, data-parallel hooks and evaluation. The trainer itself is ``integration/trainer.py``; the command line is
``python -m modelscope_plugin.training.finetune``."""
