"""Test helper: checkpoints in the seed's pycls layout (feymanpriv/DELG), written from its architecture."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch


def pycls_resnet50_state(n_cls: int, dim: int, gen: torch.Generator) -> OrderedDict:
    """A pycls DELG ``model_state`` written from the pycls architecture (feymanpriv/DELG model/resnet.py)."""
    sd: OrderedDict = OrderedDict()

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2 / (cin * k * k)) ** 0.5

    def bn(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.running_var"] = 1 + 0.1 * torch.rand(c, generator=gen)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(5)

    conv("globalmodel.stem.conv", 64, 3, 7)
    bn("globalmodel.stem.bn", 64)
    w_in = 64
    for s, (d, w_out) in enumerate(zip((3, 4, 6, 3), (256, 512, 1024, 2048)), start=1):
        w_b = w_out // 4
        for b in range(1, d + 1):
            pre = f"globalmodel.s{s}.b{b}"
            cin = w_in if b == 1 else w_out
            if b == 1:
                conv(f"{pre}.proj", w_out, cin, 1)
                bn(f"{pre}.bn", w_out)
            conv(f"{pre}.f.a", w_b, cin, 1)
            bn(f"{pre}.f.a_bn", w_b)
            conv(f"{pre}.f.b", w_b, w_b, 3)
            bn(f"{pre}.f.b_bn", w_b)
            conv(f"{pre}.f.c", w_out, w_b, 1)
            bn(f"{pre}.f.c_bn", w_out)
        w_in = w_out
    sd["globalmodel.head.pool.p"] = torch.tensor([2.7])
    sd["globalmodel.head.fc.weight"] = torch.randn(dim, 2048, generator=gen) * 0.02
    sd["globalmodel.head.fc.bias"] = torch.randn(dim, generator=gen) * 0.02
    sd["desc_cls.weight"] = torch.randn(n_cls, dim, generator=gen)
    sd["desc_cls.t"] = torch.zeros(1)
    sd["localmodel.conv1.weight"] = torch.randn(512, 1024, 1, 1, generator=gen) * 0.03
    sd["localmodel.conv1.bias"] = torch.randn(512, generator=gen) * 0.03
    bn("localmodel.bn", 512)
    sd["localmodel.conv2.weight"] = torch.randn(1, 512, 1, 1, generator=gen) * 0.03
    sd["localmodel.conv2.bias"] = torch.randn(1, generator=gen) * 0.03
    sd["att_cls.fc.weight"] = torch.randn(n_cls, 512, generator=gen) * 0.03
    sd["att_cls.fc.bias"] = torch.randn(n_cls, generator=gen) * 0.03
    return sd


def write_pycls_checkpoint(path: Path, n_cls: int = 11, dim: int = 512, seed: int = 0) -> tuple[Path, OrderedDict]:
    """A random pycls DELG R50 checkpoint at ``path`` (as the seed saves it); returns ``(path, model_state)``."""
    sd = pycls_resnet50_state(n_cls=n_cls, dim=dim, gen=torch.Generator().manual_seed(seed))
    torch.save({"epoch": 10, "model_state": sd, "optimizer_state": {}, "cfg": "MODEL:\n  DEPTH: 50\n"}, path)
    return path, sd
