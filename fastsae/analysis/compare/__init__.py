"""Comparing dictionaries: matching decoder directions between two dictionaries, feature splitting, and the
connections between SAE features across an MLP.

The front (each name imported when first used):

    compare(a, b), Comparison, splits       MMCS both ways and the matches; feature families across sizes
    load_dictionary(spec)                   an SAE directory, the toy, pca:/ica: of a store, or an array
    ConnectionData, ConnectConfig           features before and after an MLP on the same tokens; the settings
    train_connector, formulas               a connector from one to the other; sparse formulas read from it
    run_compare, run_connect                `fastsae compare`, `fastsae connect` (L1_COEFFICIENTS: its sweep)
"""

from .. import lazy_front

__all__ = ["L1_COEFFICIENTS", "Comparison", "ConnectConfig", "ConnectionData", "compare", "formulas",
           "load_dictionary", "run_compare", "run_connect", "splits", "train_connector"]
__getattr__, __dir__ = lazy_front(__name__, {
    "compare": "direction_match", "Comparison": "direction_match", "splits": "direction_match",
    "load_dictionary": "compare_run", "run_compare": "compare_run", "ConnectionData": "connections",
    "ConnectConfig": "connections", "train_connector": "connector_training", "formulas": "linear_connections",
    "run_connect": "connect_run", "L1_COEFFICIENTS": "connect_run",
})
