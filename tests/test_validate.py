import numpy as np
import pytest

from geko_data.validate import check_instance, check_int, check_number


@pytest.mark.parametrize("value", [3, np.int64(3), 0])
def test_check_int_accepts_ints_in_range(value):
    check_int("n", value, 0, 3)


@pytest.mark.parametrize("value,lo,hi,optional,message", [
    (True, 0, None, False, "`n` must be an int >= 0, got True"),
    (1.0, 0, None, False, "`n` must be an int >= 0, got 1.0"),
    (-1, 0, None, False, "`n` must be an int >= 0, got -1"),
    (5, 0, 4, False, r"`n` must be an int in \[0, 4\], got 5"),
    (5, None, 4, True, "`n` must be None or an int <= 4, got 5"),
    ("2", 1, None, True, "`n` must be None or an int >= 1, got '2'"),
])
def test_check_int_names_the_argument_value_and_what_is_allowed(value, lo, hi, optional, message):
    with pytest.raises(ValueError, match=message):
        check_int("n", value, lo, hi, optional=optional)


def test_check_int_none_only_when_optional():
    check_int("n", None, 0, optional=True)
    with pytest.raises(ValueError, match="`n` must be an int >= 0, got None"):
        check_int("n", None, 0)


@pytest.mark.parametrize("value,kw,message", [
    (float("nan"), {"lo": 0.0}, r"`x` must be a number >= 0.0, got nan"),
    (0.0, {"lo": 0.0, "hi": 1.0, "lo_open": True}, r"`x` must be a number in \(0.0, 1.0\], got 0.0"),
    (1.0, {"lo": 0.0, "hi": 1.0, "hi_open": True}, r"`x` must be a number in \[0.0, 1.0\), got 1.0"),
    (False, {}, "`x` must be a number, got False"),
])
def test_check_number(value, kw, message):
    with pytest.raises(ValueError, match=message):
        check_number("x", value, **kw)
    check_number("x", 0.5, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    check_number("x", None, optional=True)


def test_check_instance():
    check_instance("w", None, int)
    with pytest.raises(TypeError, match="`w` must be a int or str or None, got float"):
        check_instance("w", 1.5, (int, str))
    with pytest.raises(TypeError, match="`w` must be a int, got NoneType"):
        check_instance("w", None, int, optional=False)


def test_numpy_scalars_refused_where_values_go_to_json_as_given():
    # A config and training arguments are written to JSON as they are: a numpy scalar would fail there, later.
    with pytest.raises(ValueError, match=r"`n` must be an int >= 0, got np.int64\(3\)"):
        check_int("n", np.int64(3), 0, numpy=False)
    with pytest.raises(ValueError, match=r"`x` must be a number in \[0, 1\], got np.float32\(0.5\)"):
        check_number("x", np.float32(0.5), 0, 1, numpy=False)
    check_int("n", 3, 0, numpy=False)
    check_number("x", 0.5, 0, 1, numpy=False)
    from geko_data.config import GEKOConfig
    from geko_data.train.args import TrainArgs

    with pytest.raises(ValueError, match="max_repeats"):
        GEKOConfig(max_repeats=np.int64(3))
    with pytest.raises(ValueError, match="learning_rate"):
        TrainArgs(output_dir="out", learning_rate=np.float32(0.01))
