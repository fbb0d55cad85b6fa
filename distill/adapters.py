"""Adapters: the layers that map a student map to the teacher's channels, and their evaluation at chosen
cells only (the masked cells of FGFI), which costs less than the conv over the whole map."""
import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTERS = ("1x1", "3x3", "none")
ADAPTER_HELP = "student->teacher adapter: 1x1 conv, or the paper's 3x3 conv + ReLU"


def build_adapters(student_ch, teacher_ch, kind="1x1"):
    """One adaptation layer per level, student channels -> teacher channels.

    '1x1' (the trainer's default): a 1x1 Conv2d, no activation. '3x3': Conv2d 3x3 (pad 1, bias) + ReLU, as
    in the paper; YOLOv5 neck features come out of SiLU (>= -0.28), which a ReLU cannot reproduce, and
    it has 9x the weights and cost; on the shapes benchmark it closed less of the gap than 1x1 (README).
    'none': identity (needs equal channels).
    Weights start small (normal, std 0.01; zero bias): the adapter output starts near zero, so the first
    imitation gradients reaching the (often pretrained) student are small and not a random projection of
    the full error; the adapter learns the channel map before it pulls hard on the student.
    """
    student_ch, teacher_ch = list(student_ch), list(teacher_ch)
    if kind not in ADAPTERS:
        raise ValueError(f"adapter kind '{kind}' is not one of {ADAPTERS}")
    if len(student_ch) != len(teacher_ch):
        raise ValueError(f"student has {len(student_ch)} imitated levels, teacher {len(teacher_ch)}")
    layers = []
    for cs, ct in zip(student_ch, teacher_ch):
        if kind == "none":
            if cs != ct:
                raise ValueError(f"adapter 'none' needs equal channels, got student {cs} vs teacher {ct}; "
                                 f"use '1x1' or '3x3'")
            layers.append(nn.Identity())
            continue
        conv = nn.Conv2d(cs, ct, 3 if kind == "3x3" else 1, padding=1 if kind == "3x3" else 0, bias=True)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        layers.append(nn.Sequential(conv, nn.ReLU()) if kind == "3x3" else conv)
    return nn.ModuleList(layers)


def adapt_at(adapt, s, b, y, x):
    """The adapter's output at cells (b, y, x) only: [n, C_out], equal to adapt(s)[b, :, y, x].

    The loss reads the adapted student only under the mask, so a conv adapter of build_adapters is
    evaluated there only: the k x k patches of the masked cells times the conv's weight, one matmul (1x1:
    the cells' channel vectors times the weight). Forward + backward, this costs 2-3x less than the conv
    over the whole map at a typical batch's coverage (~30%), and for 1x1 less even at 100%.
    Any other module is evaluated everywhere, then picked.
    """
    conv, act = tuple(adapt) if isinstance(adapt, nn.Sequential) and len(adapt) == 2 else (adapt, None)
    k = conv.kernel_size[0] if isinstance(conv, nn.Conv2d) else 0
    if not k or conv.kernel_size != (k, k) or conv.padding != (k // 2, k // 2) or conv.stride != (1, 1) \
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return adapt(s)[b, :, y, x]
    p = k // 2
    sp = F.pad(s, (p, p, p, p)) if p else s
    bs, c, hp, wp = sp.shape
    rows = sp.permute(0, 2, 3, 1).reshape(bs * hp * wp, c)  # one row of channels per padded cell
    # the patch of cell (y, x) is padded cells (y + dy, x + dx), dy, dx < k: rows corner + dy * wp + dx
    offsets = torch.tensor([dy * wp + dx for dy in range(k) for dx in range(k)], device=s.device)
    corner = (b * hp + y) * wp + x
    patches = rows.index_select(0, (corner[:, None] + offsets).view(-1)).view(len(b), k * k * c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, k * k * c)  # same (dy, dx, c) order
    out = patches @ weight.t() if conv.bias is None else torch.addmm(conv.bias, patches, weight.t())
    return act(out) if act is not None else out
