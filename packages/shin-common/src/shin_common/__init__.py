"""Shared plumbing for the shin research toolkit.

Only what at least two of the method packages need: seeding, results records, typed configs,
logging and progress bars, and the offline text corpus.
"""

from shin_common.config import ConfigError, apply_overrides, config_to_dict, load_config, parse_overrides
from shin_common.corpus import Document, TextCorpus, byte_blocks, stdlib_corpus
from shin_common.logs import progress, setup_logging
from shin_common.records import (
    JsonlStore,
    provenance,
    read_json,
    record_key,
    to_jsonable,
    write_json_atomic,
    write_run_record,
)
from shin_common.seeding import seed_everything

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Document",
    "JsonlStore",
    "TextCorpus",
    "__version__",
    "apply_overrides",
    "byte_blocks",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "progress",
    "provenance",
    "read_json",
    "record_key",
    "seed_everything",
    "setup_logging",
    "stdlib_corpus",
    "to_jsonable",
    "write_json_atomic",
    "write_run_record",
]
