"""TieGroup, SharingPlan and the kind registry."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

import paramshare as ps
from paramshare.plans import FrozenDict, register_kind


def group(**kw):
    d = dict(kind="alias", source="a.weight", members=("a.weight", "b.weight"), shape=(4, 4))
    d.update(kw)
    return ps.TieGroup(**d)


def test_group_is_frozen_hashable_and_picklable():
    g = group(options={"bits": 4})
    assert hash(g) == hash(group(options={"bits": 4}))
    assert {g, group(options={"bits": 4})} == {g}
    assert pickle.loads(pickle.dumps(g)) == g
    assert copy.deepcopy(g) == g
    with pytest.raises(TypeError):
        g.options["bits"] = 8
    with pytest.raises(AttributeError):
        g.kind = "transpose"
    assert g != group(options={"bits": 8})


def test_group_and_plan_round_trip():
    p = ps.SharingPlan((group(), group(kind="transpose", source="c.weight", members=["d.weight"], options={"x": [1, 2]})))
    assert ps.SharingPlan.from_json(p.to_json()) == p
    assert ps.SharingPlan.from_dict(json.loads(p.to_json(indent=2))) == p
    assert len(p) == 2 and list(p)[0] == group()
    assert "transpose: c.weight -> d.weight" in str(p)
    assert str(ps.SharingPlan()) == "SharingPlan (no ties)"


@pytest.mark.parametrize(
    "groups, message",
    [
        ([{"kind": "alias", "source": "a", "members": []}], "non-empty list"),
        ([{"kind": "alias", "source": "a", "members": ["a", "a"]}], "lists a member twice"),
        ([{"kind": "alias", "source": "", "members": ["a"]}], "non-empty 'source'"),
        ([{"kind": 3, "source": "a", "members": ["a"]}], "'kind' string"),
        ([{"kind": "alias", "source": "a", "members": ["a"], "shape": [-1]}], "invalid shape"),
        ([{"kind": "alias", "source": "a", "members": ["a"], "colour": "red"}], "unknown fields"),
        ([{"kind": "alias", "source": "a", "members": ["a"], "options": [1]}], "options"),
        (["alias"], "JSON object"),
        ({"kind": "alias"}, "'groups' list"),
    ],
)
def test_invalid_plans(groups, message):
    with pytest.raises(ps.SharingError, match=message):
        ps.SharingPlan.from_dict({"format": "paramshare.plan", "version": 1, "groups": groups})


def test_wrong_format_and_version():
    with pytest.raises(ps.SharingError, match="format"):
        ps.SharingPlan.from_dict({"format": "other", "groups": []})
    with pytest.raises(ps.SharingError, match="invalid version"):
        ps.SharingPlan.from_dict({"version": "1", "groups": []})
    with pytest.raises(ps.SharingError, match="JSON object"):
        ps.SharingPlan.from_json("[1, 2]")


def test_registry_lists_builtin_kinds_and_refuses_duplicates():
    names = ps.kind_names()
    assert names[:2] == ["alias", "transpose"]
    assert ps.get_kind("alias").name == "alias"
    with pytest.raises(ps.SharingError, match="unknown sharing kind 'nope'"):
        ps.get_kind("nope")

    class Impostor(ps.Kind):
        name = "alias"

    with pytest.raises(TypeError, match="already registered"):
        register_kind(Impostor)

    class Nameless(ps.Kind):
        pass

    with pytest.raises(TypeError, match="needs a 'name'"):
        register_kind(Nameless)


def test_frozendict_json():
    d = FrozenDict({"a": 1})
    assert json.loads(json.dumps(d)) == {"a": 1}
