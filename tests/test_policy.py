import pytest

from emakit import Policy


@pytest.mark.parametrize(
    ("policy", "kwargs", "expected"),
    [
        (Policy(), {"floating": True}, "average"),
        (Policy(), {"floating": False}, "copy"),
        (Policy(), {"floating": True, "buffer": True}, "average"),
        (Policy(), {"floating": False, "buffer": True}, "copy"),
        (Policy(buffers="copy"), {"floating": True, "buffer": True}, "copy"),
        (Policy(buffers="skip"), {"floating": False, "buffer": True}, "skip"),
        (Policy(), {"floating": True, "requires_grad": False}, "average"),
        (Policy(frozen="skip"), {"floating": True, "requires_grad": False}, "skip"),
        (Policy(frozen="copy"), {"floating": True, "requires_grad": False}, "copy"),
    ],
)
def test_categories(policy, kwargs, expected):
    assert policy.action("m.x", **kwargs) == expected


def test_patterns_first_match_wins():
    p = Policy(include=("body.*",), exclude=("body.skip*",), copy=("*.scale",))
    assert p.action("head.w", floating=True) == "skip"
    assert p.action("body.skip1", floating=True) == "skip"
    assert p.action("body.scale", floating=True) == "copy"
    assert p.action("body.w", floating=True) == "average"
    assert Policy(exclude="a").exclude == ("a",)


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match=r"buffers must be one of \['average', 'copy', 'skip'\], got 'avg'"):
        Policy(buffers="avg")
    with pytest.raises(TypeError, match=r"exclude must hold strings"):
        Policy(exclude=(1,))
    with pytest.raises(TypeError, match=r"include must be a glob pattern"):
        Policy(include=3)


def test_to_dict_round_trips():
    p = Policy(buffers="copy", exclude=("x",))
    assert Policy(**p.to_dict()) == p
