"""Job configuration (pydantic) and the Arrow schemas of rows: the single source of column names."""

from .config import ConfigError, JobConfig
from .rows import OUTPUT_COLUMNS, OUTPUT_SCHEMA
from .stages import PREPROCESSED_COLUMNS, preprocessed_schema

__all__ = ["ConfigError", "JobConfig", "OUTPUT_COLUMNS", "OUTPUT_SCHEMA", "PREPROCESSED_COLUMNS", "preprocessed_schema"]
