"""Evaluations of a backbone as library code (big_vision's evaluator pattern: one small unit per
evaluator, called from training and from the command lines in ``eval/``).

* ``features``: a backbone's frozen features of a data set (``Features``; cached for checkpoints),
  ``backbone_features`` for an in-memory backbone;
* ``knn.knn``, ``fewshot.fewshot``, ``linear.linear_probe`` (cached protocol) and
  ``linear.dino_linear_probe`` (DINO's): Features (or an extractor) in, named metrics out;
* ``finetune``: the ViT paper's and MAE's fine-tuning through the training loop
  (``build_run(checkpoint, data, FinetuneSettings(...))``, then ``finetune(run)``);
* ``attention``, ``embeddings``: what an in-memory backbone's attention, filters and position
  embeddings show (the inspection figures);
* ``rankme``: the label-free effective rank of an embedding matrix;
* ``monitor``: the online monitors of a pretraining run.
"""
