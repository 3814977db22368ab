import pytest

import lowbit


def test_version_and_lazy_names():
    assert lowbit.__version__
    assert "fake_quantize" in dir(lowbit)


def test_unknown_attribute_is_clear():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lowbit.nope  # noqa: B018


def test_one_switch_turns_every_compiled_kernel_off(monkeypatch):
    from lowbit._build import ENV_VARS, extensions_disabled
    from lowbit.integer import _ext
    from lowbit.kernels import fake_quant

    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not extensions_disabled() and not fake_quant._disabled() and not _ext.disabled()
    for var in ENV_VARS:
        monkeypatch.setenv(var, "1")
        assert extensions_disabled() and fake_quant._disabled() and _ext.disabled()
        monkeypatch.setenv(var, "0")
        assert not extensions_disabled()
