"""Frozen-feature evaluation for any encoder (a callable ``images -> [N, D]`` features).

Typical use::

    from visrep.eval import extract_train_test, run_protocols, format_markdown, write_results

    feats = {
        "pretrained": extract_train_test(model.features, train_ds, test_ds, device="cuda",
                                         cache_dir="runs/feats", cache_key="ijepa-ep100", name="pretrained"),
        "random init": extract_train_test(random_model, train_ds, test_ds, device="cuda"),
    }
    results = run_protocols(feats, ["knn", "linear", "lowshot"])
    print(format_markdown(results))
    write_results(results, "runs/eval")
"""
from .features import (
    SweptInput,
    extract_features,
    extract_train_test,
    linear_input,
    linear_input_columns,
    load_feature_cache,
    save_feature_cache,
)
from .knn import knn_classify
from .linear import linear_probe, standardize
from .lowshot import fit_logreg, lowshot_logreg, lowshot_splits, preprocess_features, select_l2_by_cv
from .report import (
    PROTOCOLS,
    describe_protocols,
    format_markdown,
    format_table,
    protocols_from_config,
    run_protocols,
    save_results,
    write_results,
)

__all__ = [
    "PROTOCOLS",
    "describe_protocols",
    "extract_features",
    "extract_train_test",
    "fit_logreg",
    "format_markdown",
    "format_table",
    "knn_classify",
    "linear_input",
    "linear_input_columns",
    "SweptInput",
    "linear_probe",
    "load_feature_cache",
    "lowshot_logreg",
    "lowshot_splits",
    "preprocess_features",
    "protocols_from_config",
    "run_protocols",
    "save_feature_cache",
    "save_results",
    "select_l2_by_cv",
    "standardize",
    "write_results",
]
