"""Weighted k-nearest-neighbour evaluation, as DINO's `eval_knn.py`.

Features are a backbone's (the teacher's or the student's) outputs on un-augmented images,
L2-normalized, so the dot product is the cosine similarity. Each query's k nearest training images vote for their class with weight
exp(similarity / T). Queries are processed in batches so memory stays bounded by batch x bank size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images, to_view, batch_size: int) -> torch.Tensor:
    """L2-normalized features of `images` (a uint8 data set or tensor), in order, on the CPU as fp32.

    `to_view(uint8_batch)` turns a raw batch into the normalized input tensor on the device.
    """
    was_training = backbone.training
    backbone.eval()
    feats = []
    n = len(images)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        batch = images.__getitems__(idx) if hasattr(images, "__getitems__") else torch.stack([images[i] for i in idx])
        feats.append(F.normalize(backbone(to_view(batch)).float(), dim=1).cpu())
    backbone.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 batch_size: int = 512) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of weighted kNN with `train_*` as the bank and `test_*` as queries."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    top1 = top5 = 0
    for start in range(0, test_features.shape[0], batch_size):
        q = test_features[start : start + batch_size]
        y = test_labels[start : start + batch_size]
        sim = q @ train_features.T
        dist, idx = sim.topk(k, dim=1)
        neighbours = train_labels[idx]
        weights = (dist / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes).scatter_add_(1, neighbours, weights)
        ranked = votes.argsort(dim=1, descending=True)
        top1 += (ranked[:, 0] == y).sum().item()
        top5 += (ranked[:, : min(5, num_classes)] == y[:, None]).any(dim=1).sum().item()
    n = test_features.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n
