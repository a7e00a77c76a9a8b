"""A missing optional dependency names the extra that installs it (sonett.extras); the command's message is checked
in a real core-only install by tests/cli/test_wheel_install.py."""

import pytest

from sonett.extras import EXTRAS, MissingExtraError, install_command, requires_extra


def test_a_missing_package_names_its_extra():
    expected = r'sonett_no_such_package.*`train` extra.*pip install "sonett\[train\]"'
    with pytest.raises(MissingExtraError, match=expected), requires_extra("train"):
        import sonett_no_such_package  # noqa: F401
    # Still a ModuleNotFoundError, for callers that catch ImportError.
    with pytest.raises(ModuleNotFoundError) as caught, requires_extra("eval"):
        from sonett_no_such_package.sub import thing  # noqa: F401
    assert caught.value.name == "sonett_no_such_package"
    assert 'pip install "sonett[eval]"' in str(caught.value)


def test_other_errors_pass_through_and_unknown_extras_are_refused():
    with pytest.raises(ValueError, match="boom"), requires_extra("vision"):
        raise ValueError("boom")
    with pytest.raises(ValueError, match=r"Unknown extra 'trian'; the extras are \['deepspeed', 'eval'"):
        install_command("trian")
    assert set(EXTRAS) == {"train", "vision", "eval", "serve", "gpu", "deepspeed"}
