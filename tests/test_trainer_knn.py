"""Weighted kNN (DINO's eval_knn) against a brute-force reference, and a separable case that must score 100%."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.knn import extract_features, weighted_knn


def _reference(bank, bank_labels, queries, query_labels, k, temperature, num_classes):
    """One query at a time, straight from the definition: the k most similar bank images vote exp(sim / T)."""
    top1 = top5 = 0
    for q, y in zip(queries, query_labels):
        sims = [(float(q @ f), int(label)) for f, label in zip(bank, bank_labels)]
        sims.sort(key=lambda t: -t[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:
            votes[label] += torch.exp(torch.tensor(sim / temperature)).item()
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:5]
    n = len(query_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


@pytest.mark.parametrize("k,temperature,batch_size", [(1, 0.07, 512), (5, 0.07, 7), (20, 0.5, 16), (200, 0.07, 512)])
def test_weighted_knn_matches_brute_force(k, temperature, batch_size):
    g = torch.Generator().manual_seed(k)
    classes = 10
    centers = torch.randn(classes, 16, generator=g)
    bank_labels = torch.randint(0, classes, (120,), generator=g)
    query_labels = torch.randint(0, classes, (40,), generator=g)
    # Noisy clusters: some queries land near the wrong class, so accuracies are neither 0 nor 100.
    bank = F.normalize(centers[bank_labels] + 1.5 * torch.randn(120, 16, generator=g), dim=1)
    queries = F.normalize(centers[query_labels] + 1.5 * torch.randn(40, 16, generator=g), dim=1)
    got = weighted_knn(bank, bank_labels, queries, query_labels, k, temperature, classes, batch_size=batch_size)
    expected = _reference(bank, bank_labels, queries, query_labels, min(k, 120), temperature, classes)
    assert got == pytest.approx(expected, abs=1e-9)
    if k == 20:
        assert 0.0 < got[0] < 100.0


def test_perfectly_separated_classes_score_100_percent():
    g = torch.Generator().manual_seed(0)
    classes = 6
    directions = torch.eye(classes, 32)  # each class its own axis
    bank_labels, query_labels = torch.arange(60) % classes, torch.arange(30) % classes
    bank = F.normalize(directions[bank_labels] + 0.05 * torch.randn(60, 32, generator=g), dim=1)
    queries = F.normalize(directions[query_labels] + 0.05 * torch.randn(30, 32, generator=g), dim=1)
    assert weighted_knn(bank, bank_labels, queries, query_labels, k=20, temperature=0.07) == (100.0, 100.0)


def test_top5_is_100_when_there_are_at_most_5_classes():
    g = torch.Generator().manual_seed(1)
    bank, queries = F.normalize(torch.randn(50, 8, generator=g), dim=1), F.normalize(torch.randn(20, 8, generator=g), dim=1)
    top1, top5 = weighted_knn(bank, torch.randint(0, 3, (50,), generator=g), queries, torch.randint(0, 3, (20,), generator=g),
                              k=10, num_classes=3)
    assert top5 == 100.0 and top1 < 100.0


def test_extract_features_are_unit_norm_in_order_and_restore_training_mode():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.BatchNorm1d(5)).train()
    images = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8)
    to_view = lambda batch: batch.float() / 255.0  # noqa: E731
    feats = extract_features(backbone, images, to_view, batch_size=4)
    assert tuple(feats.shape) == (10, 5) and backbone.training
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        expected = F.normalize(backbone.eval()(to_view(images)), dim=1)  # eval mode: per-image, batch-independent
    torch.testing.assert_close(feats, expected)
