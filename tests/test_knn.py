import math

import torch
import torch.nn.functional as F

from sere_scale.eval.knn import knn_classify


def test_weighted_knn_matches_a_brute_force_vote():
    torch.manual_seed(0)
    tr = F.normalize(torch.randn(50, 8), dim=1)
    ty = torch.randint(0, 4, (50,))
    te = F.normalize(torch.randn(7, 8), dim=1)
    got = knn_classify(tr, ty, te, 4, k=5, T=0.07, chunk=3)
    for i in range(7):
        sims = [(float(te[i] @ tr[j]), j) for j in range(50)]
        sims.sort(reverse=True)
        votes = [0.0] * 4
        for s, j in sims[:5]:
            votes[int(ty[j])] += math.exp(s / 0.07)
        assert torch.allclose(got[i].double(), torch.tensor(votes, dtype=torch.float64), rtol=1e-4)


def test_knn_recovers_separable_classes():
    torch.manual_seed(1)
    centers = F.normalize(torch.randn(3, 16), dim=1)
    y = torch.arange(60) % 3
    x = F.normalize(centers[y] + 0.05 * torch.randn(60, 16), dim=1)
    scores = knn_classify(x[:45], y[:45], x[45:], 3, k=10)
    assert (scores.argmax(1) == y[45:]).all()
