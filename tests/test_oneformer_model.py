"""OneFormer without the oracle: the task is an input of the network, the Predictor passes the call's task to it,
and a bad task is one TaskError."""
import pytest
import torch
from conftest import SHARED_DATA

from modelscope_plugin.builders import build_oneformer
from modelscope_plugin.config import DinatConfig, OneFormerConfig, SwinConfig
from modelscope_plugin.errors import TaskError
from modelscope_plugin.inference.predictor import Predictor
from modelscope_plugin.inference.preprocess import load_image
from modelscope_plugin.modeling.oneformer.task_tokens import task_token_ids

IMAGE = SHARED_DATA / "photos" / "coffee.png"


def tiny_oneformer_config(backbone) -> OneFormerConfig:
    config = OneFormerConfig(backbone=backbone, num_things_classes=3, num_stuff_classes=2, num_queries=6,
                             hidden_dim=32, num_heads=2, encoder_layers=1, encoder_feedforward_dim=64,
                             decoder_layers=2, decoder_feedforward_dim=64, query_transformer_layers=1,
                             class_names=tuple(f"class_{index}" for index in range(5)), category_ids=tuple(range(5)))
    config.preprocess.short_side, config.preprocess.long_side_max = 64, 96
    return config


@pytest.mark.parametrize("backbone", [
    SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4),
    # stage 3 and 4 maps (4 x 6, 2 x 3) are smaller than a 3 x 3 window dilated by 2: padded for the attention
    DinatConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), kernel_size=3,
                dilations=((2,), (1,), (1, 2), (2,)), mlp_ratio=2.0, layer_scale_init=0.5),
])
def test_task_is_a_network_input_and_the_predictor_passes_it(backbone):
    torch.manual_seed(0)
    config = tiny_oneformer_config(backbone)
    network = build_oneformer(config).eval()
    predictor = Predictor(network, config)
    prepared = predictor.prepare(str(IMAGE))
    outputs = {}
    for task in ("panoptic", "semantic", "instance"):
        with torch.no_grad():
            outputs[task] = network(prepared.tensor[None], task=task)
        assert outputs[task].class_logits.shape == (1, 6, 6)
        assert outputs[task].mask_logits.shape == (1, 6, *(side // 4 for side in prepared.padded_size))
        # the predictor's run is the network told the task
        torch.testing.assert_close(predictor.run(prepared.tensor[None], task).mask_logits,
                                   outputs[task].mask_logits, rtol=0, atol=0)
    assert not torch.allclose(outputs["semantic"].class_logits, outputs["panoptic"].class_logits, atol=1e-4)
    # the default is the model's task
    config.task = "instance"
    torch.testing.assert_close(predictor.run(prepared.tensor[None]).class_logits, outputs["instance"].class_logits,
                               rtol=0, atol=0)
    result = predictor(str(IMAGE), task="semantic")
    assert result["sem_seg"].shape == result["masks"][0].shape == load_image(str(IMAGE)).shape[:2]


def test_bad_task_is_one_error():
    with pytest.raises(TaskError, match="'depth'"):
        task_token_ids("depth", 77)
    with pytest.raises(TaskError, match="task_seq_len 4"):
        task_token_ids("panoptic", 4)
    torch.manual_seed(0)
    config = tiny_oneformer_config(SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                              window_size=4))
    predictor = Predictor(build_oneformer(config).eval(), config)
    with pytest.raises(TaskError, match="'depth'"):
        predictor(str(IMAGE), task="depth")
