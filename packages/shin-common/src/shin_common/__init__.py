"""Shared plumbing for the shin research toolkit.

Only what at least two of the method packages need: the run contract (output directories, results
records, safe loading, one-line errors), seeding, typed configs, logging and progress bars, and the
offline text corpus.
"""

from shin_common.config import (
    ConfigError,
    add_config_options,
    config_from_args,
    config_keys,
    config_to_dict,
    load_config,
)
from shin_common.corpus import TextCorpus, byte_blocks, stdlib_corpus
from shin_common.errors import (
    ConfigMismatchError,
    CorruptFileError,
    MissingExtraError,
    OutputDirectoryError,
    UnsafeFileError,
)
from shin_common.files import import_pyplot, load_json, load_npz, load_torch, require_extra, save_torch_atomic
from shin_common.logs import progress, setup_logging
from shin_common.records import (
    JsonlStore,
    provenance,
    read_json,
    shard,
    to_jsonable,
    write_json_atomic,
    write_run_record,
)
from shin_common.registry import Registry
from shin_common.rundir import RunDirectory, check_output_path, config_changes, config_differences
from shin_common.runner import run_command
from shin_common.seeding import seed_everything

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ConfigMismatchError",
    "CorruptFileError",
    "JsonlStore",
    "MissingExtraError",
    "OutputDirectoryError",
    "Registry",
    "RunDirectory",
    "TextCorpus",
    "UnsafeFileError",
    "__version__",
    "add_config_options",
    "byte_blocks",
    "check_output_path",
    "config_changes",
    "config_differences",
    "config_from_args",
    "config_keys",
    "config_to_dict",
    "import_pyplot",
    "load_config",
    "load_json",
    "load_npz",
    "load_torch",
    "progress",
    "provenance",
    "read_json",
    "require_extra",
    "run_command",
    "save_torch_atomic",
    "seed_everything",
    "setup_logging",
    "shard",
    "stdlib_corpus",
    "to_jsonable",
    "write_json_atomic",
    "write_run_record",
]
