"""OneFormer's task input: "the task is {task}" in CLIP's byte-pair encoding, padded with zeros.

The three sentences are constants of CLIP's fixed vocabulary (``bpe_simple_vocab_16e6``, 49408 tokens), so no
tokenizer runs here: start-of-text 49406, "the" 518, "task" 10549, "is" 533, the task's own tokens, end-of-text
49407. OneFormer's processor pads the sequence to ``task_seq_len`` with zeros (its attention mask times the ids) and
the task MLP reads the ids as floats. ``tests/test_oneformer_parity.py`` checks them against a real CLIP tokenizer.
"""
from typing import Dict, Tuple

import torch

from modelscope_plugin.config import TASKS
from modelscope_plugin.errors import TaskError

TASK_TOKEN_IDS: Dict[str, Tuple[int, ...]] = {
    "panoptic": (49406, 518, 10549, 533, 1072, 24755, 49407),
    "semantic": (49406, 518, 10549, 533, 29119, 1550, 49407),
    "instance": (49406, 518, 10549, 533, 34572, 49407),
}


def task_token_ids(task: str, sequence_length: int) -> torch.Tensor:
    """(sequence_length,) int64 ids of "the task is {task}", zeros after the end-of-text token."""
    if task not in TASK_TOKEN_IDS:
        raise TaskError(f"task must be one of {TASKS}, got {task!r}")
    ids = TASK_TOKEN_IDS[task]
    if len(ids) > sequence_length:
        raise TaskError(f"task {task!r} takes {len(ids)} tokens, more than the model's task_seq_len "
                        f"{sequence_length}")
    tokens = torch.zeros(sequence_length, dtype=torch.long)
    tokens[:len(ids)] = torch.tensor(ids)
    return tokens
