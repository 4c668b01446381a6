"""The frozen base model: where each family's parts are, how to run some of them, where models come from.

* ``architectures``: the one table of architectures and what reads it (a model's blocks, norms,
  unembedding, dropout sites; running some blocks only);
* ``attention``: how each block attends (layer types, the ready masks the trunk takes, the cache);
* ``loading``: :class:`Backbone`, a frozen causal LM and its tokenizer, loaded from a source by name;
* ``tokens``: prompts and targets as left-padded token tensors;
* ``generate``: the base model's completions, the labels every estimator is judged on;
* ``frozen``: what the frozen backbone computes for an item, kept (prefixes, per-item states).
"""
