"""QM9 data: download, parsing, EDM splits, cache and batching."""

from molgen.data.qm9 import QM9, default_data_dir, load_qm9  # noqa: F401
