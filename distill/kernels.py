"""Loss kernels that several distillation methods share: the channel-wise KL divergence (whole map and
restricted to masked cells) and the per-channel standardisation of a batch of maps."""
import torch
import torch.nn.functional as F

# The --distill-norm values of the methods that compare whole maps (cwd, mgd)
STD_NORMS = ("std", "none")
STD_NORM_HELP = ("cwd, mgd: std: student and teacher maps standardised per channel over the batch and "
                 "the cells first; none: the maps as they are")


def check_std_norm(method, norm):
    """Refuse a --distill-norm value that a whole-map method (cwd, mgd) does not take."""
    if norm not in STD_NORMS:
        raise ValueError(f"--distill-method {method}: --distill-norm must be one of {', '.join(STD_NORMS)}, "
                         f"got '{norm}'")


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
    (a constant channel becomes 0): BatchNorm without affine parameters or running statistics."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) * (var + eps).rsqrt()
