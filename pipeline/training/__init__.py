"""Training and evaluation: patch datasets, losses, fitting, cross-validation, baselines, metrics.

Where each concern lives:

* the training YAML: :mod:`~pipeline.training.config`;
* patches on disk and in memory: :mod:`~pipeline.training.patch_files` (finding, checksum),
  :mod:`~pipeline.training.patch_readers` (reading), :mod:`~pipeline.training.augmentation`,
  :mod:`~pipeline.training.datasets` (the torch dataset);
* training: :mod:`~pipeline.training.losses`, :mod:`~pipeline.training.optimizer`,
  :mod:`~pipeline.training.fit` (one run), :mod:`~pipeline.training.folds`,
  :mod:`~pipeline.training.cross_validation`, :mod:`~pipeline.training.thresholds`,
  :mod:`~pipeline.training.train` (the protocol, the artefact);
* evaluation: :mod:`~pipeline.training.predict`, :mod:`~pipeline.training.metrics`,
  :mod:`~pipeline.training.baseline`, :mod:`~pipeline.training.evaluate`,
  :mod:`~pipeline.training.comparison`, :mod:`~pipeline.training.polygon_files`.

The ``train`` and ``evaluate`` commands parse their arguments in :mod:`pipeline.cli`.
"""
