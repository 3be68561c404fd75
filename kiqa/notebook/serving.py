"""Comparing the ways of scoring one set of images (Keras, SavedModel, gRPC, REST)."""

import pandas as pd


def score_differences(table, reference, columns):
    """How far each way of scoring is from a reference, in MOS points.

    Args:
        table: one row per image, one column of MOS per way of scoring.
        reference: the reference column (e.g. the Keras model's scores).
        columns: the columns to compare with it.

    Returns:
        DataFrame indexed by column with max_abs_diff and mean_abs_diff.
    """
    rows = {}
    for column in columns:
        diff = (table[column] - table[reference]).abs()
        rows[column] = dict(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
    return pd.DataFrame.from_dict(rows, orient="index")
