"""The study's experiments, one module each, run in the order listed.

An experiment module defines:

* ``TITLE`` and ``QUESTION`` (the claim it tests, in one sentence);
* ``jobs(ctx) -> list[Job]``: the runs it needs (see :mod:`paramshare.study.jobs`); runs
  that several experiments ask for with the same arguments are done once;
* ``summarize(ctx, results) -> Section``: its table, findings and figures, from
  ``results[job.key]``;
* optionally ``available(ctx) -> str | None``: why it cannot run here (e.g. a paramshare
  capability it needs is missing), or None.

Adding an experiment is adding a module here and one line to :data:`EXPERIMENTS`.
"""

#: name -> module, in report order.
EXPERIMENTS: dict[str, str] = {
    "baselines": "paramshare.study.experiments.baselines",
    "spatial": "paramshare.study.experiments.spatial",
    "limited_data": "paramshare.study.experiments.limited_data",
    "how_much": "paramshare.study.experiments.how_much",
    "siamese_autoencoder": "paramshare.study.experiments.siamese_autoencoder",
    "compression": "paramshare.study.experiments.compression",
    "soft_tying": "paramshare.study.experiments.soft_tying",
    "growl": "paramshare.study.experiments.growl",
}
