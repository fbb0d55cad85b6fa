"""Building blocks of the YOLOv5 v6+ architecture.

Attribute names (conv, bn, act, cv1, cv2, cv3, m) are part of the checkpoint format: they make the
parameter names match upstream files (model.0.conv.weight, model.2.m.0.cv1.bn.running_mean, ...).
"""
import torch
import torch.nn as nn


def autopad(k, p=None, d=1):
    """Padding that keeps the spatial size at stride 1 ('same'), for odd kernels and dilation d."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU."""

    # One SiLU instance shared by every Conv, as upstream does: it has no state, and sharing it makes
    # len(list(model.modules())) (the "layers" of the summary) equal upstream's numbers.
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        if act is True:
            self.act = self.default_act
        else:
            self.act = act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        if self.bn is None:  # folded by fuse()
            return self.forward_fuse(x)
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 then 3x3 conv, with a residual add when shapes allow it."""

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block: a bottleneck stack on one half of the channels, a plain 1x1 on the other, then fuse."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast form: three chained k x k max-pools equal pools of k, 2k-1, 3k-2."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along a dimension (channels by default)."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


@torch.no_grad()
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d with bias computing bn(conv(x)) with BN's running statistics (inference only).

    w' = w * s;  b' = b * s + (beta - gamma * mean / sqrt(var + eps)),  s = gamma / sqrt(var + eps)

    Computed in the weights' dtype in this operation order: the folded values are then bit-identical to
    upstream YOLOv5's, so a fused model's detections (and val's json) equal upstream's to the last digit.
    """
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).requires_grad_(False).to(conv.weight.device)
    std = torch.sqrt(bn.running_var + bn.eps)
    scale = bn.weight / std  # [c2]
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    b = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    fused.bias.copy_(b * scale + (bn.bias - bn.weight * bn.running_mean / std))
    return fused.to(conv.weight.dtype)
