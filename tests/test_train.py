"""Pieces of the training loop that need no dataset."""
import torch

from alexlab.train import dropout_seed


def test_dropout_masks_follow_the_position_and_differ_by_rank():
    """Seeded per (seed, epoch, step, rank): a resumed run redraws the masks an uninterrupted run
    drew, and data parallel ranks do not share them (they once did: every rank had one seed)."""
    def mask(seed, epoch, step, rank):
        torch.manual_seed(dropout_seed(seed, epoch, step, rank))
        return torch.nn.functional.dropout(torch.ones(1000), 0.5)

    reference = mask(0, 1, 2, 0)
    assert torch.equal(mask(0, 1, 2, 0), reference)
    for other in ((0, 1, 2, 1), (0, 1, 3, 0), (0, 2, 2, 0), (1, 1, 2, 0)):
        assert not torch.equal(mask(*other), reference), other
