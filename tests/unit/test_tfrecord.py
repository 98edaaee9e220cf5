"""TFRecord framing, CRC-32C, Example parsing and the dataset, against files TensorFlow wrote
(tests/data/fixtures, made by tests/data/make_fixtures.py) and hand-built protobuf bytes."""

import gzip
import json
import os
import struct
import zlib

import pytest
import torch

from dtrain import _C
from dtrain import data
from dtrain.errors import ConfigError, DataError

FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "fixtures")
EXPECTED = json.load(open(os.path.join(FIX, "expected.json")))["records"]
SPEC = {
    "label": data.FixedLen((), "int64"),
    "floats": data.FixedLen((4,), "float32"),
    "image": data.FixedLen((12,), "uint8"),
    "tokens": data.VarLen("int64"),
    "name": data.FixedLen((), "bytes"),
    "tags": data.VarLen("bytes"),
    "empty_floats": data.VarLen("float32"),
}


# ------------------------------------------------------------------ CRC-32C

@pytest.mark.parametrize("hw", [True, False])
def test_crc32c_known_values(hw):
    try:
        if not _C.data.set_crc32c_hardware(hw):
            pytest.skip("no SSE4.2 on this CPU")
        assert _C.data.crc32c(b"123456789") == 0xE3069283  # the standard check value
        assert _C.data.crc32c(b"") == 0
        assert _C.data.crc32c(bytes(32)) == 0x8A9136AA      # RFC 3720 B.4
        assert _C.data.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
        assert _C.data.crc32c(bytes(range(32))) == 0x46DD794E
    finally:
        _C.data.set_crc32c_hardware(True)


def test_crc32c_hardware_equals_table_at_every_length_and_alignment():
    blob = os.urandom(16 << 10)
    got = {}
    # lengths around the three-stream blocks (3 x 128 and 3 x 1024 bytes) and several of them
    lengths = (0, 1, 7, 8, 9, 63, 383, 384, 385, 1000, 3071, 3072, 3079, 4000, 9216, 16000)
    for hw in (True, False):
        _C.data.set_crc32c_hardware(hw)
        got[hw] = [_C.data.crc32c(blob[a:a + n]) for a in range(9) for n in lengths]
    _C.data.set_crc32c_hardware(True)
    assert got[True] == got[False]
    # continuing a CRC equals the CRC of the concatenation
    assert _C.data.crc32c(blob[100:], _C.data.crc32c(blob[:100])) == _C.data.crc32c(blob)


def test_mask_matches_the_format():
    c = 0x12345678
    assert _C.data.mask_crc(c) == ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------- TensorFlow's files

def check_record(got, want):
    assert int(got["label"]) == want["label"]
    assert got["floats"].tolist() == pytest.approx(want["floats"], abs=0, rel=0)
    assert bytes(got["image"].tolist()) == bytes.fromhex(want["image"])
    assert got["tokens"].tolist() == want["tokens"]
    assert got["name"] == bytes.fromhex(want["name"])
    assert got["tags"] == [bytes.fromhex(t) for t in want["tags"]]
    assert got["empty_floats"].numel() == 0


@pytest.mark.parametrize("name,comp", [("tf_examples.tfrecord", None), ("tf_examples.tfrecord.gz", "gzip"),
                                       ("tf_examples.tfrecord.zlib", "zlib")])
def test_reads_tensorflow_files_exactly(name, comp):
    ds = data.TFRecordDataset(os.path.join(FIX, name), SPEC, compression=comp)
    got = list(ds)
    assert len(got) == len(EXPECTED)
    for g, w in zip(got, EXPECTED):
        check_record(g, w)
    assert ds.stats()["records"] == len(EXPECTED)


@pytest.mark.parametrize("batch,drop", [(1, False), (4, False), (4, True), (23, False), (100, False)])
def test_batches_of_tensorflow_files(batch, drop):
    ds = data.TFRecordDataset(os.path.join(FIX, "tf_examples.tfrecord"), SPEC).batch(batch, drop_remainder=drop)
    batches = list(ds)
    n = len(EXPECTED)
    assert len(batches) == (n // batch if drop else -(-n // batch))
    k = 0
    for b in batches:
        rows = b["label"].shape[0]
        assert b["floats"].shape == (rows, 4) and b["image"].shape == (rows, 12)
        assert b["image"].dtype == torch.uint8 and b["label"].dtype == torch.int64
        lens = b["tokens_lengths"]
        assert b["tokens"].shape == (rows, int(lens.max()) if rows else 0)
        for r in range(rows):
            w = EXPECTED[k]
            L = int(lens[r])
            assert b["tokens"][r, :L].tolist() == w["tokens"]
            assert (b["tokens"][r, L:] == 0).all()  # padding
            assert int(b["label"][r]) == w["label"]
            assert b["name"][r] == bytes.fromhex(w["name"])
            assert b["tags"][r] == [bytes.fromhex(t) for t in w["tags"]]
            k += 1
    assert k == (n // batch * batch if drop else n)


def test_sequence_example_context():
    spec = {"label": data.FixedLen((), "int64"), "name": data.FixedLen((), "bytes")}
    got = list(data.TFRecordDataset(os.path.join(FIX, "tf_sequence.tfrecord"), spec, sequence=True))
    assert [int(g["label"]) for g in got] == [w["label"] for w in EXPECTED]
    assert [g["name"] for g in got] == [bytes.fromhex(w["name"]) for w in EXPECTED]


def test_dtrain_writer_reproduces_tensorflow_bytes(tmp_path):
    """Framing the same payloads, dtrain's writer writes TensorFlow's file byte for byte."""
    src = os.path.join(FIX, "tf_examples.tfrecord")
    payloads = [p for p, _ in data.read_records(src)]
    out = tmp_path / "again.tfrecord"
    with data.TFRecordWriter(str(out)) as w:
        for p in payloads:
            w.write(p)
    assert out.read_bytes() == open(src, "rb").read()


@pytest.mark.parametrize("comp", [None, "gzip", "zlib"])
def test_write_then_read_every_kind(tmp_path, comp):
    path = str(tmp_path / "w.tfrecord")
    recs = [{"label": -5 - i, "floats": [1.5 * i, -2.0, 0.0, 3e38], "image": bytes(range(i, i + 12)),
             "tokens": list(range(-i, i)), "name": f"n{i}", "tags": [b"a" * i], "empty_floats": []}
            for i in range(7)]
    with data.TFRecordWriter(path, compression=comp) as w:
        for r in recs:
            w.write(r)
        assert w.records == 7
    got = list(data.TFRecordDataset(path, SPEC, compression=comp))
    for g, r in zip(got, recs):
        assert int(g["label"]) == r["label"]
        assert g["floats"].tolist() == [float(torch.tensor(x, dtype=torch.float32)) for x in r["floats"]]
        assert bytes(g["image"].tolist()) == r["image"]
        assert g["tokens"].tolist() == r["tokens"]
        assert g["name"] == r["name"].encode() and g["tags"] == r["tags"]
    if comp == "gzip":
        assert open(path, "rb").read(2) == b"\x1f\x8b"
        assert len(gzip.decompress(open(path, "rb").read())) > 0


def test_writer_leaves_nothing_on_exception(tmp_path):
    path = tmp_path / "keep.tfrecord"
    with data.TFRecordWriter(str(path)) as w:
        w.write(b"old")
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with data.TFRecordWriter(str(path)) as w:
            w.write(b"new, never finished")
            raise RuntimeError("crash")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.tfrecord"]


# -------------------------------------------- protobuf corner cases, by hand

def varint(v):
    v &= (1 << 64) - 1
    out = b""
    while v >= 0x80:
        out += bytes([(v & 0x7F) | 0x80])
        v >>= 7
    return out + bytes([v])


def ld(field, body):
    return varint(field << 3 | 2) + varint(len(body)) + body


def entry(key, feature, value_first=False, junk=b""):
    k, v = ld(1, key.encode()), ld(2, feature)
    return ld(1, junk + (v + k if value_first else k + v))


def example(*entries, extra=b""):
    return ld(1, b"".join(entries)) + extra


def int64_unpacked(*vals):
    return ld(3, b"".join(varint(1 << 3 | 0) + varint(v) for v in vals))


def float_unpacked(*vals):
    return ld(2, b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in vals))


def parse(spec, *records):
    b = _C.data.parse_examples(data.spec.to_schema(spec), list(records))
    return data.dataset.columns(spec, b)


def test_unpacked_values_value_before_key_unknown_fields_and_repeated_keys():
    spec = {"i": data.FixedLen((3,), "int64"), "f": data.FixedLen((2,), "float32")}
    unknown = varint(7 << 3 | 0) + varint(99) + ld(9, b"zzz") + varint(5 << 3 | 5) + b"\0\0\0\0"
    rec = example(entry("i", int64_unpacked(1, 2, 3)),
                  entry("f", float_unpacked(0.5, -1.0), value_first=True, junk=unknown),
                  entry("i", int64_unpacked(-1, 2 ** 63 - 1, -(2 ** 63))),  # repeated key: the last wins
                  extra=unknown)
    out = parse(spec, rec)
    assert out["i"].tolist() == [[-1, 2 ** 63 - 1, -(2 ** 63)]]
    assert out["f"].tolist() == [[0.5, -1.0]]


def test_features_message_split_in_two_merges():
    spec = {"a": data.FixedLen((), "int64"), "b": data.FixedLen((), "int64")}
    rec = example(entry("a", int64_unpacked(1))) + example(entry("b", int64_unpacked(2)))
    out = parse(spec, rec)
    assert out["a"].tolist() == [1] and out["b"].tolist() == [2]


@pytest.mark.parametrize("spec,rec,match", [
    ({"x": data.FixedLen((), "int64")}, example(entry("x", float_unpacked(1.0))), "float_list but the spec says int64"),
    ({"x": data.FixedLen((2,), "float32")}, example(entry("x", float_unpacked(1.0))), "has 1 values but FixedLen"),
    ({"x": data.FixedLen((), "int64")}, example(entry("y", int64_unpacked(1))), "'x' is missing"),
    ({"x": data.FixedLen((4,), "uint8")}, example(entry("x", ld(1, ld(1, b"abc")))), "has 3 bytes"),
    ({"x": data.FixedLen((), "int64")}, b"\x0a\x05\x0a\x03", "says 5 bytes but only 2 remain"),
    ({"x": data.FixedLen((), "int64")}, b"\x0b", "wire type 3"),
])
def test_bad_examples_name_the_feature(spec, rec, match):
    with pytest.raises(DataError, match=match):
        parse(spec, rec)


def test_defaults_fill_missing_features():
    spec = {"x": data.FixedLen((2,), "float32", default=1.5), "s": data.FixedLen((), "bytes", default=b"d"),
            "v": data.VarLen("int64")}
    out = parse(spec, example(), example(entry("x", float_unpacked(3.0, 4.0))))
    assert out["x"].tolist() == [[1.5, 1.5], [3.0, 4.0]]
    assert out["s"] == [b"d", b"d"]
    assert out["v_lengths"].tolist() == [0, 0]


@pytest.mark.parametrize("bad", [
    lambda: data.FixedLen((2,), "complex64"),
    lambda: data.FixedLen((-1,), "int64"),
    lambda: data.spec.to_schema({"x": data.FixedLen((3,), "float32", default=[1.0, 2.0])}),
    lambda: data.spec.to_schema({"x": "float32"}),
    lambda: data.spec.to_schema({}),
])
def test_bad_specs_are_config_errors(bad):
    with pytest.raises(ConfigError):
        bad()


# ----------------------------------------------------------- damaged files

def framed(payload):
    head = struct.pack("<Q", len(payload))
    return (head + struct.pack("<I", _C.data.mask_crc(_C.data.crc32c(head))) + payload +
            struct.pack("<I", _C.data.mask_crc(_C.data.crc32c(payload))))


def good_file(tmp_path, n=5, name="f.tfrecord"):
    recs = [data.encode_example({"label": i}) for i in range(n)]
    blob = b"".join(framed(r) for r in recs)
    path = tmp_path / name
    path.write_bytes(blob)
    offsets = [sum(len(framed(r)) for r in recs[:i]) for i in range(n)]
    return path, blob, offsets


LABEL = {"label": data.FixedLen((), "int64")}


def damage(blob, offsets, how):
    b = bytearray(blob)
    if how == "length":
        b[offsets[2] + 1] ^= 0x10
    elif how == "length_crc":
        b[offsets[2] + 9] ^= 0x01
    elif how == "payload":
        b[offsets[2] + 14] ^= 0x40
    elif how == "data_crc":
        b[offsets[3] - 1] ^= 0x80
    elif how == "truncated":
        b = b[:-3]
    elif how == "huge_length":
        head = struct.pack("<Q", 1 << 30)
        b[offsets[2]: offsets[2] + 12] = head + struct.pack("<I", _C.data.mask_crc(_C.data.crc32c(head)))
    return bytes(b)


@pytest.mark.parametrize("how,bad_index", [("length", 2), ("length_crc", 2), ("payload", 2), ("data_crc", 2),
                                           ("truncated", 4), ("huge_length", 2)])
def test_damage_is_named_or_skipped_alone(tmp_path, how, bad_index):
    path, blob, offsets = good_file(tmp_path)
    path.write_bytes(damage(blob, offsets, how))
    with pytest.raises(DataError) as e:
        list(data.TFRecordDataset(str(path), LABEL))
    msg = str(e.value)
    assert str(path) in msg and f"byte offset {offsets[bad_index]}" in msg, msg
    ds = data.TFRecordDataset(str(path), LABEL, on_error="skip")
    labels = [int(r["label"]) for r in ds]
    if how == "huge_length":
        # a length whose own CRC holds but runs past the file cannot be told from a cut-off
        # last record: the reader stops there, having lost nothing before it
        assert labels == [0, 1]
    else:
        assert labels == [i for i in range(5) if i != bad_index]
    assert ds.stats()["bad_records"] == 1
    assert len(ds.problems()) == 1 and f"byte offset {offsets[bad_index]}" in ds.problems()[0]


def test_bad_example_is_skipped_alone(tmp_path):
    recs = [data.encode_example({"label": i}) for i in range(4)]
    recs[1] = data.encode_example({"label": [1.5]})  # wrong type
    path = tmp_path / "e.tfrecord"
    path.write_bytes(b"".join(framed(r) for r in recs))
    with pytest.raises(DataError, match=r"e\.tfrecord: record at byte offset \d+, feature 'label'"):
        list(data.TFRecordDataset(str(path), LABEL))
    ds = data.TFRecordDataset(str(path), LABEL, on_error="skip")
    assert [int(r["label"]) for r in ds] == [0, 2, 3]
    assert ds.stats()["bad_examples"] == 1


def test_empty_file(tmp_path):
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    with pytest.raises(DataError, match="empty.tfrecord: the file is empty"):
        data.TFRecordDataset(str(tmp_path / "empty.tfrecord"), LABEL)
    path, _, _ = good_file(tmp_path, 3)
    ds = data.TFRecordDataset([str(tmp_path / "empty.tfrecord"), str(path)], LABEL, on_error="skip")
    assert [int(r["label"]) for r in ds] == [0, 1, 2]


@pytest.mark.parametrize("comp", ["gzip", "zlib"])
def test_compressed_stream_cut_short(tmp_path, comp):
    path, blob, _ = good_file(tmp_path, 200)
    z = gzip.compress(blob) if comp == "gzip" else zlib.compress(blob)
    cut = tmp_path / "cut"
    cut.write_bytes(z[: len(z) * 2 // 3])
    with pytest.raises(DataError, match=f"cut.*{comp} stream cut short"):
        list(data.TFRecordDataset(str(cut), LABEL, compression=comp))


def test_gzip_with_several_members(tmp_path):
    a, blob_a, _ = good_file(tmp_path, 3, "a")
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(blob_a) + gzip.compress(blob_a))
    assert [int(r["label"]) for r in data.TFRecordDataset(str(path), LABEL, compression="gzip")] == [0, 1, 2] * 2


def test_wrong_compression_is_named(tmp_path):
    path, _, _ = good_file(tmp_path)
    with pytest.raises(DataError, match="not a valid gzip stream.*compression argument"):
        list(data.TFRecordDataset(str(path), LABEL, compression="gzip"))


def test_missing_files_and_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="no files match"):
        data.TFRecordDataset(str(tmp_path / "*.tfrecord"), LABEL)
    with pytest.raises(ConfigError, match="does not exist"):
        data.TFRecordDataset(str(tmp_path / "nope"), LABEL)
    path, _, _ = good_file(tmp_path)
    with pytest.raises(ConfigError, match="on_error"):
        data.TFRecordDataset(str(path), LABEL, on_error="ignore")
    with pytest.raises(ConfigError, match="compression"):
        data.TFRecordDataset(str(path), LABEL, compression="lz4")
    with pytest.raises(ConfigError, match="batch_size"):
        data.TFRecordDataset(str(path), LABEL).batch(0)


def test_raw_records_and_index(tmp_path):
    path, blob, offsets = good_file(tmp_path, 6)
    raw = list(data.TFRecordDataset(str(path)))
    assert raw == [data.encode_example({"label": i}) for i in range(6)]
    assert [len(b) for b in data.TFRecordDataset(str(path)).batch(4)] == [4, 2]
    entries = data.build_index(str(path))
    assert [o for o, _ in entries] == offsets
    assert sum(n for _, n in entries) == len(blob)
    assert data.read_index(str(path) + ".idx") == entries
    path.write_bytes(damage(blob, offsets, "payload"))
    with pytest.raises(DataError, match=f"byte offset {offsets[2]}"):
        data.build_index(str(path), out=str(tmp_path / "x.idx"))
    assert not (tmp_path / "x.idx").exists()


# -------------------------------------------------------------------- fuzz

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

FUZZ_SPEC = {"label": data.FixedLen((), "int64", default=0), "f": data.VarLen("float32"),
             "b": data.VarLen("bytes"), "u": data.VarLen("uint8")}
SEED = example(entry("label", int64_unpacked(3)), entry("f", float_unpacked(1.0, 2.0)),
               entry("b", ld(1, ld(1, b"xy"))), entry("u", ld(1, ld(1, b"pq"))))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_parser_random_bytes(blob):
    try:
        parse(FUZZ_SPEC, blob)
    except DataError:
        pass


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(SEED)))
def test_fuzz_parser_mutated_examples(edits, cut):
    b = bytearray(SEED)
    for i, v in edits:
        b[i] = v
    try:
        parse(FUZZ_SPEC, bytes(b[:cut]))
    except DataError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=8), st.integers(0, 10 ** 6))
def test_fuzz_framing(tmp_path_factory, edits, cut):
    blob = bytearray(b"".join(framed(data.encode_example({"label": i, "u": [b"z" * i]})) for i in range(12)))
    for i, v in edits:
        blob[i % len(blob)] = v
    blob = blob[: cut % (len(blob) + 1)]
    path = tmp_path_factory.mktemp("fz") / "f"
    path.write_bytes(bytes(blob))
    try:
        n = sum(1 for _ in data.TFRecordDataset(str(path), FUZZ_SPEC, on_error="skip"))
        assert n <= 12
    except DataError as e:
        assert "empty" in str(e)
