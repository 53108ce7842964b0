"""Independent functional re-implementations of the published network layouts (docs/method.md section 9).

Plain functional ops and the published key names, no hf_csr code: the converted hf_csr models are checked
against these. ``*_state_dict`` build random checkpoints in the original formats (with the wrapper prefix).
"""

import torch
import torch.nn.functional as F

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_STD = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _bn(sd, prefix, x):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], training=False, eps=1e-5)


def _random_wrn_state(depth, width, num_classes, seed, batches_tracked, stem, groups, parts, final, head):
    """A random WideResNet state dict under the given names. ``groups``: (block prefix, group index) in
    generation order; ``parts``: the names of (bn before conv 0, conv 0, bn before conv 1, conv 1, shortcut)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cout, cin, k):
        sd[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (k * k * cout)) ** 0.5

    def bn(name, c):
        sd[name + ".weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[name + ".num_batches_tracked"] = torch.tensor(batches_tracked)

    ch = [16, 16 * width, 32 * width, 64 * width]
    bn_0, conv_0, bn_1, conv_1, shortcut = parts
    conv(stem, 16, 3, 3)
    for prefix, gi in groups:
        for k in range((depth - 4) // 6):
            cin, cout = (ch[gi] if k == 0 else ch[gi + 1]), ch[gi + 1]
            p = f"{prefix}.{k}."
            bn(p + bn_0, cin)
            conv(p + conv_0, cout, cin, 3)
            bn(p + bn_1, cout)
            conv(p + conv_1, cout, cout, 3)
            if cin != cout:
                conv(p + shortcut, cout, cin, 1)
    bn(final, ch[3])
    sd[head + ".weight"] = torch.randn(num_classes, ch[3], generator=g) * 0.1
    sd[head + ".bias"] = torch.randn(num_classes, generator=g) * 0.1
    return sd


def ddpm_state_dict(depth, width, num_classes, seed):
    """A random DDPM-layout checkpoint as published: keys ``module.0.*``."""
    sd = _random_wrn_state(depth, width, num_classes, seed, 100, "init_conv", [(f"layer.{g}.block", g) for g in range(3)],
                           ("batchnorm_0", "conv_0", "batchnorm_1", "conv_1", "shortcut"), "batchnorm", "logits")
    return {"module.0." + k: v for k, v in sd.items()}


def ddpm_reference_forward(checkpoint, x, depth, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    sd = {k[len("module.0."):]: v for k, v in checkpoint.items()}
    act = F.silu
    out = F.conv2d((x - mean) / std, sd["init_conv.weight"], padding=1)
    for gi in range(3):
        for k in range((depth - 4) // 6):
            p = f"layer.{gi}.block.{k}."
            stride = 2 if gi > 0 and k == 0 else 1
            pre = act(_bn(sd, p + "batchnorm_0.", out))
            padded = F.pad(pre, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))
            h = F.conv2d(padded, sd[p + "conv_0.weight"], stride=stride, padding=0)
            h = F.conv2d(act(_bn(sd, p + "batchnorm_1.", h)), sd[p + "conv_1.weight"], padding=1)
            residual = F.conv2d(pre, sd[p + "shortcut.weight"], stride=stride) if p + "shortcut.weight" in sd else out
            out = residual + h
    out = F.avg_pool2d(act(_bn(sd, "batchnorm.", out)), 8).flatten(1)
    return F.linear(out, sd["logits.weight"], sd["logits.bias"])


def trades_state_dict(depth, width, num_classes, seed):
    """A random TRADES-layout checkpoint: keys ``module.*``, with the unused ``sub_block1``."""
    groups = [("block1.layer", 0), ("sub_block1.layer", 0), ("block2.layer", 1), ("block3.layer", 2)]
    sd = _random_wrn_state(depth, width, num_classes, seed, 7, "conv1", groups,
                           ("bn1", "conv1", "bn2", "conv2", "convShortcut"), "bn1", "fc")
    return {"module." + k: v for k, v in sd.items()}


def trades_reference_forward(checkpoint, x, depth):
    sd = {k[len("module."):]: v for k, v in checkpoint.items()}
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for gi, block in enumerate(("block1", "block2", "block3")):
        for k in range((depth - 4) // 6):
            p = f"{block}.layer.{k}."
            stride = 2 if gi > 0 and k == 0 else 1
            pre = F.relu(_bn(sd, p + "bn1.", out))
            h = F.conv2d(pre, sd[p + "conv1.weight"], stride=stride, padding=1)
            h = F.conv2d(F.relu(_bn(sd, p + "bn2.", h)), sd[p + "conv2.weight"], padding=1)
            shortcut = p + "convShortcut.weight"
            out = (F.conv2d(pre, sd[shortcut], stride=stride) if shortcut in sd else out) + h
    out = F.avg_pool2d(F.relu(_bn(sd, "bn1.", out)), 8).flatten(1)
    return F.linear(out, sd["fc.weight"], sd["fc.bias"])
