"""Seeded, shaped random FastInst weights whose outputs are not degenerate, for the benchmarks and the bf16 test
(random weights alone give dead batch-norm statistics, one class for every query and masks that cover half the
image). Needs only torch and the network: it runs on the GPU machine without ModelScope or the test tree."""
import torch


def shape_fastinst_weights(network: torch.nn.Module, seed: int = 0, proposal_gain: float = 1.0,
                           mask_offset: float = 0.0) -> None:
    """Non-degenerate random FastInst outputs (after tests/oracles/fastinst_oracle.py's ``shape_weights``, without
    its calibration): live batch-norm statistics, a defined meta position map, spread class logits and sparse masks
    (a constant mask-feature channel whose coefficient is ``mask_offset``). ``proposal_gain`` sharpens the
    instance-activation head, so the picked queries stand apart."""
    generator = torch.Generator().manual_seed(seed)
    decoder = network.transformer_decoder
    with torch.no_grad():
        for module in network.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        decoder.meta_pos_embed.copy_(torch.randn(decoder.meta_pos_embed.shape, generator=generator))
        decoder.query_proposal.conv_proposal_cls_logits[2].weight.mul_(proposal_gain)
        for layers in (decoder.class_embed_layers, decoder.mask_embed_layers):
            for mlp in layers:
                for linear in mlp.layers:
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator)
                                        * (2.0 / linear.weight.shape[1]) ** 0.5)
                    linear.bias.zero_()
        for mlp in decoder.class_embed_layers:
            mlp.layers[-1].weight.mul_(4.0)
        for linear in decoder.mask_features_layers:
            linear.weight[-1] = 0
            linear.bias[-1] = 1.0
        for mlp in decoder.mask_embed_layers:
            mlp.layers[-1].weight[-1] = 0
            mlp.layers[-1].bias[-1] = mask_offset
