"""TFRecord input without TensorFlow: specs, a dataset, a writer and index files."""

from dtrain.data.dataset import TFRecordDataset
from dtrain.data.spec import FixedLen, VarLen, encode_example
from dtrain.data.tfrecord import TFRecordWriter, build_index, read_index, read_records

__all__ = ["TFRecordDataset", "FixedLen", "VarLen", "TFRecordWriter", "encode_example", "build_index",
           "read_index", "read_records"]
