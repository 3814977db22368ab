import pytest

import lowbit


def test_version_and_lazy_names():
    assert lowbit.__version__
    assert "fake_quantize" in dir(lowbit)


def test_unknown_attribute_is_clear():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lowbit.nope  # noqa: B018
