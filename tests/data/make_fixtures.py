"""Writes the TensorFlow-made fixtures in tests/data/fixtures (run once, with TensorFlow):

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu
    /tmp/tf/bin/python tests/data/make_fixtures.py

Every file is written by tf.io.TFRecordWriter; expected.json holds the values put in,
so the tests check dtrain's reading against what TensorFlow wrote without needing
TensorFlow themselves. Files stay small (a few KiB each).
"""

import json
import os

import numpy as np
import tensorflow as tf

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def records():
    rng = np.random.default_rng(7)
    out = []
    for i in range(23):  # odd on purpose
        n = int(rng.integers(0, 6))
        out.append({
            "label": int(rng.integers(-2**62, 2**62)) if i % 5 else -1,  # negatives: 10-byte varints
            "floats": rng.standard_normal(4).astype(np.float32).tolist(),
            "image": rng.integers(0, 256, 12, dtype=np.uint8).tobytes().hex(),
            "tokens": rng.integers(-1000, 100000, n).tolist(),
            "name": f"record-{i}".encode().hex(),
            "tags": [f"t{k}".encode().hex() for k in range(i % 3)],
            "empty_floats": [],
        })
    return out


def example(r):
    f = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        "label": f(int64_list=tf.train.Int64List(value=[r["label"]])),
        "floats": f(float_list=tf.train.FloatList(value=r["floats"])),
        "image": f(bytes_list=tf.train.BytesList(value=[bytes.fromhex(r["image"])])),
        "tokens": f(int64_list=tf.train.Int64List(value=r["tokens"])),
        "name": f(bytes_list=tf.train.BytesList(value=[bytes.fromhex(r["name"])])),
        "tags": f(bytes_list=tf.train.BytesList(value=[bytes.fromhex(t) for t in r["tags"]])),
        "empty_floats": f(float_list=tf.train.FloatList(value=[])),
    })).SerializeToString()


def sequence_example(r):
    f = tf.train.Feature
    ctx = tf.train.Features(feature={
        "label": f(int64_list=tf.train.Int64List(value=[r["label"]])),
        "name": f(bytes_list=tf.train.BytesList(value=[bytes.fromhex(r["name"])])),
    })
    steps = tf.train.FeatureList(feature=[f(float_list=tf.train.FloatList(value=[float(t)])) for t in r["tokens"]])
    return tf.train.SequenceExample(context=ctx, feature_lists=tf.train.FeatureLists(
        feature_list={"steps": steps})).SerializeToString()


def main():
    os.makedirs(HERE, exist_ok=True)
    rs = records()
    for comp, suffix in ((None, ""), ("GZIP", ".gz"), ("ZLIB", ".zlib")):
        opts = tf.io.TFRecordOptions(compression_type=comp or "")
        with tf.io.TFRecordWriter(os.path.join(HERE, f"tf_examples.tfrecord{suffix}"), opts) as w:
            for r in rs:
                w.write(example(r))
    with tf.io.TFRecordWriter(os.path.join(HERE, "tf_sequence.tfrecord")) as w:
        for r in rs:
            w.write(sequence_example(r))
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump({"tensorflow": tf.__version__, "records": rs}, f, indent=0)
    print("wrote", sorted(os.listdir(HERE)))


if __name__ == "__main__":
    main()
