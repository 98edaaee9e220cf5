"""Reads files dtrain wrote with TensorFlow and compares them to what was written.

    .venv/bin/python tests/data/check_with_tensorflow.py write OUTDIR     # dtrain's venv
    /tmp/tf/bin/python tests/data/check_with_tensorflow.py read OUTDIR    # a venv with tensorflow-cpu

(TensorFlow is not a test dependency: it is large. This is the other half of the
compatibility check; tests/unit/test_tfrecord.py covers TensorFlow's files in dtrain.)
"""

import json
import os
import sys

RECORDS = [{"label": -3 + i, "floats": [0.25 * i, -1.5], "image": bytes(range(i, i + 6)).hex(),
            "tokens": list(range(i)), "name": f"n{i}"} for i in range(9)]
COMPRESSIONS = {"": None, ".gz": "gzip", ".zlib": "zlib"}


def write(out):
    import torch
    from dtrain import data
    os.makedirs(out, exist_ok=True)
    for suffix, comp in COMPRESSIONS.items():
        with data.TFRecordWriter(os.path.join(out, "dtrain.tfrecord" + suffix), compression=comp) as w:
            for r in RECORDS:
                w.write({"label": r["label"], "floats": r["floats"],
                         "image": torch.tensor(list(bytes.fromhex(r["image"])), dtype=torch.uint8),
                         "tokens": r["tokens"], "name": r["name"]})
    print("wrote", sorted(os.listdir(out)))


def read(out):
    import tensorflow as tf
    spec = {"label": tf.io.FixedLenFeature([], tf.int64), "floats": tf.io.FixedLenFeature([2], tf.float32),
            "image": tf.io.FixedLenFeature([], tf.string), "tokens": tf.io.VarLenFeature(tf.int64),
            "name": tf.io.FixedLenFeature([], tf.string)}
    for suffix, comp in COMPRESSIONS.items():
        ds = tf.data.TFRecordDataset(os.path.join(out, "dtrain.tfrecord" + suffix),
                                     compression_type=(comp or "").upper())
        got = [tf.io.parse_single_example(r, spec) for r in ds]
        assert len(got) == len(RECORDS), (suffix, len(got))
        for g, r in zip(got, RECORDS):
            assert int(g["label"]) == r["label"]
            assert g["floats"].numpy().tolist() == r["floats"]
            assert g["image"].numpy() == bytes.fromhex(r["image"])
            assert tf.sparse.to_dense(g["tokens"]).numpy().tolist() == r["tokens"]
            assert g["name"].numpy() == r["name"].encode()
        print(f"tensorflow {tf.__version__} read dtrain.tfrecord{suffix}: {len(got)} records, all equal")


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](sys.argv[2])
