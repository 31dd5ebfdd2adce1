"""`lcl eval probe`: the probes on features whose answer is known, and the command end to end on an image folder."""


import torch

from lcl_megatron.eval.probe import attentive_probe, latent_spread, linear_probe


def separable(n, dim=16, classes=4, seed=0, noise=0.3):
    """Train and test sets (n and n // 2 rows) of points around one centre per class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim) * 3
    labels = torch.arange(n + n // 2) % classes
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return (x[:n], labels[:n]), (x[n:], labels[n:])


def test_linear_probe_separates_classes_and_not_random_labels():
    torch.manual_seed(0)
    (x, y), (tx, ty) = separable(400)
    assert linear_probe(x, y, tx, ty) == 1.0
    shuffled = y[torch.randperm(400, generator=torch.Generator().manual_seed(0))]
    assert linear_probe(x, shuffled, tx, ty) < 0.5  # chance is 0.25


def test_attentive_probe_finds_the_informative_token_and_is_deterministic():
    # The class is carried by one of 6 tokens, at a random position; the others are noise.
    def hide(x, seed):
        g = torch.Generator().manual_seed(seed)
        out = torch.randn(x.shape[0], 6, x.shape[1], generator=g)
        out[torch.arange(x.shape[0]), torch.randint(0, 6, (x.shape[0],), generator=g)] = x
        return out

    torch.manual_seed(0)
    (x, y), (tx, ty) = separable(400)
    x, tx = hide(x, 1), hide(tx, 2)
    first = attentive_probe(x, y, tx, ty, seed=0, epochs=30)
    assert first > 0.7  # chance 0.25
    assert attentive_probe(x, y, tx, ty, seed=0, epochs=30) == first


def test_latent_spread_detects_collapse():
    spread = latent_spread(torch.randn(200, 32))
    collapsed = latent_spread(torch.ones(200, 32) + 1e-4 * torch.randn(200, 32))
    assert spread["latent_effective_rank"] > 20 and spread["latent_variance"] > 0.9
    assert collapsed["latent_variance"] < 1e-6


