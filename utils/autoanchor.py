"""AutoAnchor: check that the model's anchors fit the training labels; re-fit them if not.

Fit is the wh ratio metric the loss matches with: a label fits an anchor when both side ratios r
satisfy max(r, 1/r) < thr (thr = hyp anchor_t). Best possible recall (BPR) = fraction of labels that
fit at least one anchor. Below 0.98, new anchors come from k-means on label wh (whitened) followed by
a genetic mutation search; they replace the old ones only when their BPR is higher.
"""
import numpy as np
import torch

from utils.logging import LOGGER, colorstr

PREFIX = colorstr("AutoAnchor: ")
BPR_OK = 0.98
KMEANS_MAX_POINTS = 30000  # k-means on a random subset of huge label sets; evolution still sees all labels


def label_wh(dataset, img_size=640, rng=None):
    """Label sizes in pixels [n, 2] with each image resized so its long side is img_size.

    With `rng`, each image is scaled by a random 0.9-1.1 like the training augmentation does.
    """
    shapes = np.asarray(dataset.shapes, dtype=np.float64).reshape(-1, 2)
    if len(shapes) != len(dataset.labels):
        raise ValueError(f"dataset.shapes has {len(shapes)} rows but dataset.labels {len(dataset.labels)}")
    shapes = img_size * shapes / shapes.max(1, keepdims=True)
    if rng is not None:
        shapes = shapes * rng.uniform(0.9, 1.1, size=(len(shapes), 1))
    wh = [np.asarray(lb, dtype=np.float64).reshape(-1, 5)[:, 3:5] * s for s, lb in zip(shapes, dataset.labels)]
    return np.concatenate(wh, 0) if wh else np.zeros((0, 2))


def ratio_metric(k, wh):
    """x [n, na]: min over w and h of min(r, 1/r) for every label/anchor pair; best [n]: max over anchors."""
    a, b = wh[:, None], k[None]  # [n, 1, 2], [1, na, 2]
    x = (np.minimum(a, b) / np.maximum(np.maximum(a, b), 1e-9)).min(2)  # min(r, 1/r) without inf; 0-size -> 0
    return x, x.max(1) if x.shape[1] else np.zeros(len(wh))


def anchor_stats(k, wh, thr=4.0):
    """(BPR, mean number of anchors above threshold per label)."""
    if not len(wh):
        return 0.0, 0.0
    x, best = ratio_metric(k, wh)
    return float((best > 1 / thr).mean()), float((x > 1 / thr).sum(1).mean())


def anchor_fitness(k, wh, thr=4.0):
    """Mean best-anchor ratio over labels, counting only labels above 1/thr (the evolution objective)."""
    _, best = ratio_metric(k.astype(wh.dtype), wh)
    return float((best * (best > 1 / thr)).mean())


def _sq_dist(x, c):
    return ((x[:, None] - c[None]) ** 2).sum(2)  # [n_points, n_centres]


def kmeans(x, n, rng, restarts=10, iters=100, thresh=1e-5):
    """Lloyd's k-means with k-means++ seeding -> centroids [n, d] of the restart with least mean distance.

    A run stops once the mean point-to-centroid distance improves by no more than `thresh`.
    """
    best, best_err = None, np.inf
    for _ in range(restarts):
        c = x[[rng.integers(len(x))]]
        while len(c) < n:  # k-means++: next centre drawn with probability ~ squared distance to the nearest
            d2 = _sq_dist(x, c).min(1)
            i = rng.choice(len(x), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(x))
            c = np.concatenate((c, x[[i]]))
        prev = np.inf
        for _ in range(iters):
            d2 = _sq_dist(x, c)
            assign = d2.argmin(1)
            err = np.sqrt(d2[np.arange(len(x)), assign]).mean()
            if err < best_err:
                best, best_err = c, err
            if prev - err <= thresh:
                break
            prev = err
            count = np.bincount(assign, minlength=n)
            c = np.stack([np.bincount(assign, weights=x[:, j], minlength=n) for j in range(x.shape[1])], 1)
            c = c / np.maximum(count, 1)[:, None]
            c[count == 0] = x[d2.min(1).argmax()]  # an empty cluster restarts at the worst-served point
    return best


def _log_anchors(k, wh0, thr, n, img_size):
    bpr, aat = anchor_stats(k, wh0, thr)
    x, best = ratio_metric(k, wh0)
    LOGGER.info(f"{PREFIX}thr={1 / thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr\n"
                f"{PREFIX}n={n}, img_size={img_size}, metric_all={x.mean():.3f}/{best.mean():.3f}-mean/best, "
                f"past_thr={x[x > 1 / thr].mean() if (x > 1 / thr).any() else 0:.3f}-mean: "
                + ", ".join(f"{round(w)},{round(h)}" for w, h in k))


def kmean_anchors(dataset_or_wh, n=9, img_size=640, thr=4.0, gen=1000, verbose=False, seed=0):
    """New anchors [n, 2] (pixels at img_size, float32, sorted by area) fitted to the labels.

    dataset_or_wh: a dataset with .labels ([k, 5] cls+xywhn arrays) and .shapes ([N, 2] w, h), a data
    yaml (its train split is loaded), or label sizes [m, 2] in pixels. Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    if isinstance(dataset_or_wh, (str, bytes)) or hasattr(dataset_or_wh, "__fspath__"):
        from utils.data_config import check_dataset  # only needed for this entry point
        from utils.dataloaders import create_dataloader
        data = check_dataset(str(dataset_or_wh))
        _, dataset_or_wh = create_dataloader(data["train"], img_size, 1, 32, rect=True, workers=0)
    if hasattr(dataset_or_wh, "labels"):
        wh0 = label_wh(dataset_or_wh, img_size)
    else:
        wh0 = np.asarray(dataset_or_wh, dtype=np.float64).reshape(-1, 2)
    tiny = int((wh0 < 3.0).any(1).sum())
    if tiny:
        LOGGER.info(f"{PREFIX}WARNING ⚠️ Extremely small objects found: {tiny} of {len(wh0)} labels are <3 pixels")
    wh = wh0[(wh0 >= 2.0).any(1)].astype(np.float32)  # drop labels under 2 px on both sides

    if len(wh) >= n and (std := wh.std(0)).all():
        LOGGER.info(f"{PREFIX}Running k-means for {n} anchors on {len(wh)} points...")
        x = wh if len(wh) <= KMEANS_MAX_POINTS else wh[rng.choice(len(wh), KMEANS_MAX_POINTS, replace=False)]
        k = kmeans(x / std, n, rng) * std  # whitened: w and h weigh the same
    else:
        LOGGER.warning(f"{PREFIX}WARNING ⚠️ {len(wh)} usable labels for {n} anchors: switching from k-means "
                       "to random initialisation")
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * img_size
    k = np.clip(k, 2.0, None)
    if not len(wh):
        return k[np.argsort(k.prod(1))].astype(np.float32)

    # Genetic search: each generation scales ~90% (mp) of the anchor sides by 1 + u·sigma·N(0, 1), u ~ U(0, 1)
    # drawn once per generation; a mutant replaces the anchors only when its fitness is higher.
    f, mp, sigma = anchor_fitness(k, wh, thr), 0.9, 0.1
    for g in range(gen):
        v = np.ones(k.shape)
        while (v == 1).all():  # at least one side must change
            v = ((rng.random(k.shape) < mp) * rng.random() * rng.standard_normal(k.shape) * sigma + 1).clip(0.3, 3.0)
        kg = (k * v).clip(min=2.0)
        fg = anchor_fitness(kg, wh, thr)
        if fg > f:
            f, k = fg, kg
            if verbose:
                LOGGER.info(f"{PREFIX}generation {g + 1}/{gen}: fitness {f:.4f}")
    k = k[np.argsort(k.prod(1))]
    _log_anchors(k, wh0, thr, n, img_size)
    return k.astype(np.float32)


def check_anchors(dataset, model, thr=4.0, imgsz=640, seed=0, gen=1000):
    """Log the BPR of the model's anchors on `dataset`; below 0.98 re-fit them in place. Returns the BPR in use.

    New anchors go into Detect.anchors ([nl, na, 2], stride units), smallest on the smallest stride.
    """
    m = getattr(model, "module", model).model[-1]  # Detect
    rng = np.random.default_rng(seed)
    wh = label_wh(dataset, imgsz, rng)
    if not len(wh):
        LOGGER.warning(f"{PREFIX}WARNING ⚠️ no labels in the dataset: anchors left unchanged")
        return 0.0
    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)
    current = (m.anchors * stride).view(-1, 2).cpu().double().numpy()  # pixels
    bpr, aat = anchor_stats(current, wh, thr)
    msg = f"{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > BPR_OK:
        LOGGER.info(msg + "Current anchors are a good fit to dataset ✅")
        return bpr
    LOGGER.info(msg + "Anchors are a poor fit to dataset ⚠️, attempting to improve...")
    new = kmean_anchors(dataset, n=m.anchors.numel() // 2, img_size=imgsz, thr=thr, gen=gen, seed=seed)
    new_bpr, _ = anchor_stats(new.astype(np.float64), wh, thr)
    if new_bpr <= bpr:
        LOGGER.info(f"{PREFIX}Done ⚠️ (original anchors better than new anchors, proceeding with original anchors)")
        return bpr
    # new is sorted by area: hand out consecutive groups of na to the levels in increasing stride order
    levels = torch.as_tensor(new).view(m.nl, -1, 2).to(m.anchors)
    order = torch.argsort(m.stride.view(-1).cpu())
    with torch.no_grad():
        for j, lvl in enumerate(order.tolist()):
            m.anchors[lvl] = levels[j] / stride[lvl]
    LOGGER.info(f"{PREFIX}New anchors saved to model, BPR {bpr:.3f} -> {new_bpr:.3f}. Update model *.yaml to "
                "use these anchors in the future.")
    return new_bpr
