"""Session data: storage, readers, SR-GNN preprocessing, splits, synthetic data, partitions.

Only numpy is imported here; batching (torch) and rich tables load when used.
"""

from fedenc.data.partition import (
    heterogeneity,
    partition,
    partition_indices,
    partition_stats,
    print_partition_stats,
)
from fedenc.data.preprocess import PreparedData, SRGNNProtocol, preprocess
from fedenc.data.readers import (
    Clicks,
    DataFileNotFoundError,
    DataFormatError,
    read_diginetica_clicks,
    read_session_text,
    read_yoochoose_clicks,
)
from fedenc.data.sessions import Examples, Sessions
from fedenc.data.splits import DataSplits, default_data_dir, load_dataset, train_valid_split
from fedenc.data.synthetic import SyntheticConfig, SyntheticWorld, generate

__all__ = [
    "Clicks",
    "DataFileNotFoundError",
    "DataFormatError",
    "DataSplits",
    "Examples",
    "PreparedData",
    "SRGNNProtocol",
    "Sessions",
    "SyntheticConfig",
    "SyntheticWorld",
    "default_data_dir",
    "generate",
    "heterogeneity",
    "load_dataset",
    "partition",
    "partition_indices",
    "partition_stats",
    "preprocess",
    "print_partition_stats",
    "read_diginetica_clicks",
    "read_session_text",
    "read_yoochoose_clicks",
    "train_valid_split",
]
