"""The package's CLIP tokenizer (modeling/oneformer/clip_tokenizer.py) against open_clip's (oracle environment) on
the text lists OneFormer trains with: "a photo with a {name}" for every class name of the built-in tables, and the
padding sentences, at the text encoder's context length and at a truncating one."""
import json

import numpy as np
import pytest
from conftest import run_oracle

from modelscope_plugin.data.categories import BUILTIN_CLASS_TABLES
from modelscope_plugin.modeling.oneformer.clip_tokenizer import END_OF_TEXT, START_OF_TEXT, clip_tokenizer
from modelscope_plugin.modeling.oneformer.task_tokens import TASK_TOKEN_IDS
from modelscope_plugin.modeling.oneformer.training_targets import PADDING_TEXT


def test_task_sentences_give_the_constant_task_ids():
    for task, ids in TASK_TOKEN_IDS.items():
        tokens = clip_tokenizer().tokenize([f"the task is {task}"], 77)[0].tolist()
        assert tokens == list(ids) + [0] * (77 - len(ids)), task


def test_truncation_keeps_the_end_of_text_token_and_cleans_whitespace():
    tokens = clip_tokenizer().tokenize(["a photo with a chest of drawers, chest, bureau, dresser"], 6)[0].tolist()
    assert tokens[0] == START_OF_TEXT and tokens[-1] == END_OF_TEXT and 0 not in tokens
    spaced = clip_tokenizer().tokenize(["  A   Photo\twith a &amp; TV "], 16)
    assert spaced.tolist() == clip_tokenizer().tokenize(["a photo with a & tv"], 16).tolist()


@pytest.mark.oracle
def test_text_lists_equal_open_clip_tokenizer(tmp_path):
    names = sorted({name for table in BUILTIN_CLASS_TABLES for name in table.class_names})
    texts = [f"a photo with a {name}" for name in names] + list(PADDING_TEXT.values()) + ["the wall's 2nd i/o_port"]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    for length in (77, 8):
        run_oracle("oneformer_oracle.py", "texts", "--texts", tmp_path / "texts.json", "--context-length", length,
                   "--result", tmp_path / "tokens.npz")
        reference = np.load(tmp_path / "tokens.npz")["open_clip"]
        ours = clip_tokenizer().tokenize(texts, length).numpy()
        assert ours.shape == reference.shape == (len(texts), length)
        mismatched = [text for text, mine, theirs in zip(texts, ours, reference) if mine.tolist() != theirs.tolist()]
        assert not mismatched, (length, mismatched)
