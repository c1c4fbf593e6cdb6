"""The restricted unpickler: plain data (containers, scalars, numpy arrays as numpy 1 and 2 pickle them) loads
like ``pickle.load``; anything naming another global is refused before it runs, with a one-line error naming
the file; the same content as JSON loads too."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess

import numpy as np
import pytest

from grounding.coco_io import GroundingInputError
from grounding.safe_pickle import UnsafePickleError, load_plain_data, load_plain_pickle, loads_plain_pickle


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


class _Subprocess:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


@pytest.mark.parametrize("payload", [_System, _Exec, _Subprocess])
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path, payload, protocol):
    marker = tmp_path / "ran"
    # The payload hides inside plain data, as it would in a doctored refs(unc).p.
    data = [{"ref_id": 1, "sentences": [{"sent": "x", "evil": payload(marker)}]}]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError) as err:
        load_plain_pickle(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "refused" in message
    assert not marker.exists()  # nothing the pickle names was called
    # The control: the standard unpickler does run it (so the payload is real).
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_plain_data_round_trips_like_pickle(tmp_path):
    values = [
        {"counts": b"PPYo1", "size": [2, 3], "ok": True, "none": None, "f": 0.25, "t": (1, "a")},
        {1, 2},
        frozenset({"a"}),
        bytearray(b"xy"),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([0.5, 1.5], dtype=np.float32),
        np.asfortranarray(np.eye(3, dtype=bool)),
        np.array(["ab", "c"]),
        np.float32(0.75),
        np.int64(7),
        [np.zeros((0, 5), np.float32)],
    ]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for value in values:
            loaded = loads_plain_pickle(pickle.dumps(value, protocol=protocol))
            assert type(loaded) is type(value)
            if isinstance(value, np.ndarray):
                assert loaded.dtype == value.dtype and np.array_equal(loaded, value)
            elif isinstance(value, list) and isinstance(value[0], np.ndarray):
                assert loaded[0].shape == (0, 5)
            else:
                assert loaded == value


def test_numpy_1_and_python_2_pickles_load():
    # numpy 1.x writes numpy.core.multiarray where numpy 2.x writes numpy._core.multiarray.
    data = pickle.dumps(np.arange(4.0), protocol=2)
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data
    assert np.array_equal(loads_plain_pickle(old), np.arange(4.0))
    # Python 2: a str is a SHORT_BINSTRING (bytes), decoded as latin-1; a protocol-2 set is __builtin__.set.
    py2 = b"\x80\x02}q\x00U\x04sentq\x01c__builtin__\nset\nq\x02]q\x03K\x01a\x85q\x04Rq\x05s."
    assert loads_plain_pickle(py2) == {"sent": {1}}


def test_codecs_encode_is_only_latin1_of_a_str():
    # _codecs.encode(obj, 'zlib') or other codecs are not what bytes pickling writes: refused.
    evil = (
        b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x04\x00\x00\x00zlibq\x02\x86q\x03Rq\x04."
    )
    with pytest.raises(GroundingInputError, match="_codecs.encode is only allowed"):
        loads_plain_pickle(evil, "x.p")


def test_json_equivalent_and_broken_files(tmp_path):
    content = [{"image_id": 3, "masks": [{"size": [2, 2], "counts": "04"}], "scores": [0.5]}]
    as_json = tmp_path / "results.json"
    as_json.write_text("\n  " + json.dumps(content))
    assert load_plain_data(as_json, "proposals") == content
    as_pickle = tmp_path / "results.pkl"
    as_pickle.write_bytes(pickle.dumps(content, protocol=2))
    assert load_plain_data(as_pickle, "proposals") == content
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps(content, protocol=2)[:-5])
    with pytest.raises(GroundingInputError, match=r"truncated\.pkl: not a readable pickle") as err:
        load_plain_data(truncated, "proposals")
    assert "\n" not in str(err.value)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"a": ')
    with pytest.raises(GroundingInputError, match=r"bad\.json: malformed JSON in proposals file"):
        load_plain_data(bad_json, "proposals")
    with pytest.raises(GroundingInputError, match=r"missing\.p: RefCOCO refs file not found"):
        load_plain_data(tmp_path / "missing.p", "RefCOCO refs")
