"""Scoring prompts with a trained latent: the Python API behind ``vtrans score`` (:class:`Scorer`).

* ``scorer``: :class:`Scorer`, completions and uncertainty scores for prompts, streamed.
"""
