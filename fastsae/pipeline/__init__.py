"""Orchestration as functions: open a data source, fold its normalisation into the SAE once, record
provenance and which corpus windows were used, and run harvest -> train -> eval (the main job)."""

from .data_sources import DataConfig, DataSource, finish_sae, open_data
from .runs import RunSettings, harvest_run, main_job, read_run, settings_from, train_run

__all__ = ["DataConfig", "DataSource", "RunSettings", "finish_sae", "harvest_run", "main_job", "open_data",
           "read_run", "settings_from", "train_run"]
