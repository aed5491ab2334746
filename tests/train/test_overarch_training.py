"""OverArch's losses against plain loops."""

import torch
import torch.nn.functional as F

from sterling.train.overarch import listwise_loss, overarch_loss


def plain_listwise(logits, labels, valid, impressions):
    losses = []
    r_, m_, t_ = logits.shape
    for t in range(t_):
        for r in range(r_):
            for m in range(m_):
                if not (valid[r, m] and labels[r, m, t] > 0):
                    continue
                keep = [m] + [j for j in range(impressions, m_) if valid[r, j] and not labels[r, j, t] > 0]
                row = logits[r, keep, t]
                losses.append(-(row[0] - torch.logsumexp(row, 0)))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def test_listwise_and_total_loss_match_plain_loops():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        r, m, t, imp = 4, 9, 3, 5
        logits = torch.randn(r, m, t, generator=gen)
        labels = (torch.rand(r, m, t, generator=gen) < 0.3).float()
        labels[:, imp:] = 0.0  # retrieved negatives carry no positive label
        labels[0] = 0.0  # a request without positives
        valid = torch.rand(r, m, generator=gen) < 0.85
        want = plain_listwise(logits, labels, valid, imp)
        torch.testing.assert_close(listwise_loss(logits, labels, valid, imp), want)
        bce = F.binary_cross_entropy_with_logits(logits[valid], labels[valid])
        torch.testing.assert_close(overarch_loss(logits, labels, valid, imp), bce + want)
