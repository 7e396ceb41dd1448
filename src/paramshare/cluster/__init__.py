"""Weight clustering: optimal 1-D k-means, codebook weights, bit packing.

Public API (also at the top level: ``ps.kmeans1d``, ``ps.cluster``, ``ps.uncluster``):

* :func:`kmeans1d`: exact optimal 1-D k-means (or Lloyd's heuristic), deterministic.
* :func:`cluster` / :func:`uncluster`: weights become ``centroids[labels]`` (the
  ``codebook`` sharing kind, :mod:`paramshare.kinds.codebook`) and back.
* :func:`set_codebook` / :func:`get_codebook`: build or read one codebook weight from
  centroids and labels you computed yourself.
* :func:`pack_bits` / :func:`unpack_bits` / :func:`bits_for`: labels at ``ceil(log2 k)`` bits.

Building a codebook weight from given centroids and labels (e.g. a mixture prior's means)::

    from paramshare.cluster import set_codebook, get_codebook
    # centroids: (k,) floats, or (codebooks, k) for one codebook per group of rows
    # labels: integers in 0..k-1 with the weight's shape
    set_codebook(model, "fc1.weight", centroids, labels, zero=True)  # zero: centroid 0 pinned at 0.0
    centroids_param, labels = get_codebook(model, "fc1.weight")

The result is an ordinary ``codebook`` group: ``ps.plan``, ``ps.report`` (bits per weight,
bytes with the codebook), ``ps.check``, ``ps.save``/``ps.load`` (labels packed at
``ceil(log2 k)`` bits; ``compress=True`` entropy-codes them) all handle it, and the
centroids train like any parameter.

Note: ``ps.cluster`` is the function; import this package's helpers with
``from paramshare.cluster import ...`` (``import paramshare.cluster as m`` gives the function).
"""

from .bits import bits_for, pack_bits, packed_size, unpack_bits
from .core import DEFAULT_TYPES, INITS, cluster, get_codebook, select, set_codebook, uncluster
from .kmeans import kmeans1d, sse

__all__ = [
    "kmeans1d",
    "sse",
    "cluster",
    "uncluster",
    "set_codebook",
    "get_codebook",
    "select",
    "bits_for",
    "pack_bits",
    "unpack_bits",
    "packed_size",
    "DEFAULT_TYPES",
    "INITS",
]
