"""paramshare's fast ``is_parametrized`` answers exactly as torch's."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize

import paramshare as ps
from paramshare._parametrize import is_parametrized


def test_is_parametrized_agrees_with_torch_on_plain_tied_and_torch_parametrized_modules():
    ae = nn.ModuleDict({"enc": nn.Linear(8, 4), "dec": nn.Linear(4, 8), "norm": nn.Linear(3, 3), "plain": nn.Linear(2, 2)})
    ps.tie(ae, "enc.weight", "dec.weight", transpose=True)
    parametrizations.weight_norm(ae["norm"])
    odd = nn.Linear(2, 2)
    odd.__dict__["parametrizations"] = "not a ModuleDict"  # an attribute of that name, not torch's
    modules = [*ae.values(), odd, ae]
    for m in modules:
        for attr in (None, "weight", "bias", "missing"):
            assert is_parametrized(m, attr) == parametrize.is_parametrized(m, attr), (m, attr)
    assert is_parametrized(ae["dec"], "weight") and is_parametrized(ae["norm"], "weight")
    assert not is_parametrized(ae["plain"]) and not is_parametrized(ae["dec"], "bias") and not is_parametrized(odd)
