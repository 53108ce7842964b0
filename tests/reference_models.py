"""Independent functional re-implementations of the published network layouts (METHOD.md section 9).

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


def ddpm_state_dict(depth, width, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cout, cin, k):
        sd[name] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (k * k * cout)) ** 0.5

    def bn(name, c):
        sd[name + ".weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[name + ".num_batches_tracked"] = torch.tensor(100)

    n = (depth - 4) // 6
    ch = [16, 16 * width, 32 * width, 64 * width]
    conv("init_conv.weight", 16, 3, 3)
    for gi in range(3):
        for k in range(n):
            cin = ch[gi] if k == 0 else ch[gi + 1]
            cout = ch[gi + 1]
            p = f"layer.{gi}.block.{k}."
            bn(p + "batchnorm_0", cin)
            conv(p + "conv_0.weight", cout, cin, 3)
            bn(p + "batchnorm_1", cout)
            conv(p + "conv_1.weight", cout, cout, 3)
            if cin != cout:
                conv(p + "shortcut.weight", cout, cin, 1)
    bn("batchnorm", ch[3])
    sd["logits.weight"] = torch.randn(num_classes, ch[3], generator=g) * 0.1
    sd["logits.bias"] = torch.randn(num_classes, generator=g) * 0.1
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
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cout, cin, k):
        sd[name] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (k * k * cout)) ** 0.5

    def bn(name, c):
        sd[name + ".weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[name + ".num_batches_tracked"] = torch.tensor(7)

    n = (depth - 4) // 6
    ch = [16, 16 * width, 32 * width, 64 * width]
    conv("conv1.weight", 16, 3, 3)
    for block in ("block1", "sub_block1", "block2", "block3"):
        gi = {"block1": 0, "sub_block1": 0, "block2": 1, "block3": 2}[block]
        for k in range(n):
            cin = ch[gi] if k == 0 else ch[gi + 1]
            cout = ch[gi + 1]
            p = f"{block}.layer.{k}."
            bn(p + "bn1", cin)
            conv(p + "conv1.weight", cout, cin, 3)
            bn(p + "bn2", cout)
            conv(p + "conv2.weight", cout, cout, 3)
            if cin != cout:
                conv(p + "convShortcut.weight", cout, cin, 1)
    bn("bn1", ch[3])
    sd["fc.weight"] = torch.randn(num_classes, ch[3], generator=g) * 0.1
    sd["fc.bias"] = torch.randn(num_classes, generator=g) * 0.1
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
