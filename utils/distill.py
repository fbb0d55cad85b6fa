"""Fine-grained Feature Imitation (Wang et al., CVPR 2019): adaptation layers, loss, FeatureImitation.

The student imitates the teacher's neck features (the maps Detect consumes) only at the cells near
objects, given by the imitation masks of utils/distill_mask.py (re-exported here). The paper's imitation
loss is the squared error between adapt(student) and teacher over masked cells and channels, divided by
2 * (number of masked cells); the trainer's default (normalize='kl') instead compares each channel's
softmax over the masked cells of an image, in KL divergence (see imitation_loss).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.distill_mask import KINDS, imitation_mask, imitation_masks, mask_coverage  # noqa: F401

ADAPTERS = ("3x3", "1x1", "none")

# ----------------------------------------------------------------------------------------------------
# Adaptation layers and loss

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


NORMS = (None, "channel", "pkd", "kl")


def channel_kl(s, t, tau=1.0):
    """tau^2 * sum_{n, c} KL(softmax(t[n, c] / tau) || softmax(s[n, c] / tau)) / (C * N), each channel's softmax
    over the cells of its image, for s and t [N, C, H, W] of equal shape (CWD's loss of one level)."""
    n, c = t.shape[:2]
    log_p_t = F.log_softmax(t.flatten(2) / tau, dim=-1)
    log_p_s = F.log_softmax(s.flatten(2) / tau, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() * (tau * tau) / (c * n)


def masked_channel_kl(a, t, b, batch_size):
    """channel_kl with each image's softmax over its masked cells only, from the cells themselves: a and t
    [N_p, C] (adapted student and teacher at the masked cells), b [N_p] their image indices. N counts the
    images with a masked cell; no masked cell at all gives an empty sum, 0 still connected to a."""
    def log_softmax_per_image(v):
        peak = v.new_zeros(batch_size, v.shape[1]).index_reduce_(0, b, v.detach(), "amax", include_self=False)
        z = v - peak[b]  # the softmax ignores the shift; it keeps exp() in range
        return z - v.new_zeros(batch_size, v.shape[1]).index_add_(0, b, z.exp()).log()[b]

    images = torch.zeros(batch_size, dtype=torch.bool, device=b.device).index_fill_(0, b, True).sum()
    log_p_t, log_p_s = log_softmax_per_image(t), log_softmax_per_image(a)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() / (t.shape[1] * images.clamp(min=1))


def standardize_channels(x, eps=1e-5):
    """x [N, C, H, W] with each channel shifted and scaled to mean 0, variance 1 over the batch and the cells
    (a constant channel becomes 0)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) * (var + eps).rsqrt()


def imitation_loss(student_feats, teacher_feats, masks, adapters, normalize=None):
    """Sum over levels of sum_{masked cells, channels} (adapt(s) - t)^2 / (2 * N_p), in float32.

    N_p = masked cells of the level over the batch; a level with no masked cell gives 0 that is still
    connected to the student and the adapter. normalize='channel' also divides each level by its channels.
    normalize='pkd' (Cao et al., NeurIPS 2022) first standardises every channel of adapt(s) and of t over
    the whole maps of the batch (standardize_channels), then divides by the channels too: the term then
    depends neither on the teacher's feature magnitudes nor on its channel count (with every cell masked
    it is the mean over channels of 1 - the Pearson correlation of the two maps: 0 to 2).
    normalize='kl' replaces the squared error by CWD's divergence restricted to the mask: per image and
    channel, softmax over the image's masked cells of adapt(s) and of t, KL(teacher || student), divided by
    channels * images with a masked cell (masked_channel_kl); it depends on neither the feature scale nor the
    channel count. The adapter is evaluated at the masked cells only (adapt_at), except under 'pkd', which
    standardises the whole adapted map.
    Returns (loss scalar, per_level detached [nl]).
    """
    if normalize not in NORMS:
        raise ValueError(f"normalize must be one of {NORMS}, got {normalize}")
    if not len(student_feats) == len(teacher_feats) == len(masks) == len(adapters):
        raise ValueError(f"levels differ: {len(student_feats)} student, {len(teacher_feats)} teacher, "
                         f"{len(masks)} masks, {len(adapters)} adapters")
    terms = []
    for s, t, m, adapt in zip(student_feats, teacher_feats, masks, adapters):
        t = t.detach().float()
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:] or m.shape != (t.shape[0], *t.shape[2:]):
            raise ValueError(f"shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}, "
                             f"mask {tuple(m.shape)}")
        b, y, x = m.nonzero(as_tuple=True)  # one host sync per level: the number of masked cells
        with torch.autocast(device_type=s.device.type, enabled=False):
            if normalize == "pkd":
                a, t = standardize_channels(adapt(s.float()))[b, :, y, x], standardize_channels(t)
            else:
                a = adapt_at(adapt, s.float(), b, y, x)  # [N_p, C_t]
        if a.shape[1] != t.shape[1]:
            raise ValueError(f"adapted student has {a.shape[1]} channels, teacher {t.shape[1]}")
        if normalize == "kl":
            terms.append(masked_channel_kl(a, t[b, :, y, x], b, t.shape[0]))
            continue
        sq = (a - t[b, :, y, x]).pow(2).sum()  # no masked cell: an empty sum, 0 still connected to s and adapt
        term = sq / (2 * max(b.numel(), 1))
        terms.append(term if normalize is None else term / t.shape[1])  # channel, pkd
    loss = torch.stack(terms).sum()
    return loss, torch.stack(terms).detach()


class FeatureImitation(nn.Module):
    """Adapters + settings of the imitation term.

    student_ch, teacher_ch: channels of every level Detect consumes; levels: indices imitated (default
    all); adapter: build_adapters kind; thresh (psi), kind, anchor_t: imitation_mask settings; weight:
    lambda; warmup: iterations before the term switches on; normalize: imitation_loss option.
    state_dict() has exactly the keys of build_adapters(...).state_dict() (the adapters are the only
    children), so it can be a checkpoint's 'adapters' and loaded into either.
    """

    def __init__(self, student_ch, teacher_ch, levels=None, adapter="1x1", thresh=0.5, kind="fine",
                 anchor_t=None, weight=0.01, warmup=0, normalize=None):
        super().__init__()
        levels = list(range(len(student_ch))) if levels is None else [int(i) for i in levels]
        if not levels or any(not 0 <= i < len(student_ch) for i in levels):
            raise ValueError(f"imitated levels {levels} not within 0..{len(student_ch) - 1}")
        if kind not in KINDS or normalize not in NORMS:
            raise ValueError(f"bad imitation kind '{kind}' or normalize '{normalize}'")
        adapters = build_adapters([student_ch[i] for i in levels], [teacher_ch[i] for i in levels], adapter)
        for k, m in enumerate(adapters):
            self.add_module(str(k), m)
        self.adapters = list(adapters)  # plain list: the modules are registered once, under '0', '1', ...
        self.levels, self.thresh, self.kind, self.anchor_t = levels, thresh, kind, anchor_t
        self.weight, self.warmup, self.normalize = weight, warmup, normalize

    def forward(self, student_feats, teacher_feats, targets, anchors_px_per_level, strides, iteration):
        """-> (weight * imitation loss, stats), for all levels' features (lists indexed like Detect's inputs),
        the batch targets [n, 6], anchors in pixels per level ([na, 2] each), strides (Python numbers or a
        CPU tensor) and the global iteration. Before `warmup` iterations: a zero still connected to the
        student features and the adapters. stats: 'loss' (weighted), 'raw', 'per_level' (detached tensors),
        'masks' (list of bool masks, also during warm-up, so the first batch's plot and the coverage log
        exist from the start; pass to mask_coverage when logging); 'active' (False during warm-up)."""
        s = [student_feats[i] for i in self.levels]
        masks = imitation_masks(targets, [anchors_px_per_level[i] for i in self.levels],
                                [float(strides[i]) for i in self.levels], [x.shape[2:] for x in s], s[0].shape[0],
                                self.thresh, self.kind, self.anchor_t)
        if iteration < self.warmup:
            zero = sum(x.float().sum() for x in s) * 0.0
            zero = zero + sum(p.sum() for p in self.parameters()) * 0.0
            z = zero.detach()
            return zero, {"loss": z, "raw": z, "per_level": z.repeat(len(s)), "masks": masks, "active": False}
        t = [teacher_feats[i] for i in self.levels]
        raw, per_level = imitation_loss(s, t, masks, self.adapters, self.normalize)
        loss = raw * self.weight
        return loss, {"loss": loss.detach(), "raw": raw.detach(), "per_level": per_level, "masks": masks,
                      "active": True}
