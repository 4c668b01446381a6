"""The estimator names (a contract: other tools read them) and the family that computes each."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "baselines": ("msp", "entropy"),
    "attention": ("attention_entropy",),
    "lens": ("lens_ce", "lens_area"),
    "mc_dropout": ("mc_dropout_var", "mc_dropout_entropy", "mc_dropout_mi"),
    "latent": ("posterior_var", "latent_kl"),  # the latent's encoders only: no z samples
    "latent_mi": ("latent_mi", "latent_nll"),  # S samples of z through the upper blocks
    "sampling": ("sample_disagreement", "sample_word_entropy"),  # K sampled words vs the greedy one
    "probe": ("probe",),
}
NAMES: tuple[str, ...] = tuple(name for names in FAMILIES.values() for name in names)
LATENT_FAMILIES = ("latent", "latent_mi")
NEEDS_LATENT = frozenset(n for f in LATENT_FAMILIES for n in FAMILIES[f])
# read the scored position (ŷ, the completion's first token) only: no mean/max over the word
FIRST_TOKEN_ONLY = frozenset({"attention_entropy", *FAMILIES["latent_mi"], *FAMILIES["mc_dropout"]})


def family_of(name: str) -> str:
    for family, names in FAMILIES.items():
        if name in names:
            return family
    raise KeyError(name)
