"""Domain conditioning: FiLM starts at the identity, and conditioning changes nothing until trained."""
import torch

from metacontrastive.models.clip import DomainConditionedCLIP, EncoderConfig
from metacontrastive.models.conditioning import DomainEmbedding, FiLM


def test_film_is_identity_at_init():
    film = FiLM(cond_dim=8, feature_dim=16)
    h, cond = torch.randn(5, 16), torch.randn(5, 8)
    assert torch.equal(film(h, cond), h)


def test_film_modulates_once_trained():
    film = FiLM(cond_dim=8, feature_dim=16)
    torch.nn.init.normal_(film.to_gamma_beta.weight)
    h = torch.randn(5, 16)
    assert not torch.allclose(film(h, torch.randn(5, 8)), h)


def test_domain_embedding_has_an_unknown_entry():
    emb = DomainEmbedding(num_domains=3, dim=4)
    assert emb(torch.tensor([0, 3])).shape == (2, 4)


def test_conditioned_clip_equals_unconditioned_at_init():
    torch.manual_seed(0)
    conditioned = DomainConditionedCLIP(2, EncoderConfig())
    plain = DomainConditionedCLIP(2, EncoderConfig(condition_image=False, condition_text=False))
    plain.load_state_dict(conditioned.state_dict(), strict=False)  # same towers and heads
    images, texts = torch.rand(4, 3, 16, 16), ["a photo of a red star", "a chest radiograph showing a nodule"]
    for domain in (0, 1, conditioned.unknown_domain):
        z_c = conditioned(images, texts, domain)
        z_p = plain(images, texts, domain)
        assert torch.equal(z_c[0], z_p[0]) and torch.equal(z_c[1], z_p[1])
    assert plain.film_image is None and plain.film_text is None
