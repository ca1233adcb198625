"""The config tree: strict loading, key-path errors, --set overrides, mlflow.yml and its env override."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_embed.config import apply_overrides, flatten, load_config, load_mlflow_settings
from recsys_embed.errors import ConfigError
from tests.conftest import REPO


def test_shipped_configs_load() -> None:
    retail = load_config(REPO / "configs/retail.yaml")
    assert retail.ingest.event_weights == {"purchase": 1.0, "cancellation": -1.0}
    assert retail.ingest.item_filters[0].name == "non_product_item"
    synthetic = load_config(REPO / "configs/synthetic.yaml")
    assert synthetic.ingest.event_weights["purchase"] > synthetic.ingest.event_weights["view"]


def test_unknown_key_fails_with_its_path(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("ingest:\n  columns:\n    usr: customer\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "ingest.columns.usr" in msg and "bad.yaml" in msg and "Extra inputs are not permitted" in msg


def test_invalid_value_names_key_and_reason(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("split:\n  test_quantile: 1.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"split\.test_quantile: .*less than 1"):
        load_config(p)


def test_set_overrides_any_field_with_yaml_scalars() -> None:
    cfg = load_config(
        REPO / "configs/retail.yaml",
        ["ingest.source.path=logs/*.csv.gz", "models.bpr.enabled=false", "eval.ks=[5, 50]", "models.als.factors=8"],
    )
    assert cfg.ingest.source.path == "logs/*.csv.gz"
    assert cfg.models.bpr.enabled is False
    assert cfg.eval.ks == [5, 50]
    assert cfg.models.als.factors == 8


def test_set_rejects_unknown_keys_and_malformed_items() -> None:
    with pytest.raises(ConfigError, match=r"models\.als\.factorz"):
        load_config(None, ["models.als.factorz=8"])
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        apply_overrides({}, ["models.als.factors"])


def test_split_without_time_requires_random_split() -> None:
    with pytest.raises(ConfigError, match="needs a timestamp column"):
        load_config(None, ["ingest.columns.timestamp=null"])
    assert load_config(None, ["ingest.columns.timestamp=null", "split.method=random"]).split.method == "random"


def test_missing_config_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_mlflow_settings_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "mlflow.yml"
    p.write_text("tracking_uri: sqlite:///x.db\nexperiment_name: e1\n", encoding="utf-8")
    assert load_mlflow_settings(p).tracking_uri == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    s = load_mlflow_settings(p)
    assert s.tracking_uri == "http://127.0.0.1:5999" and s.experiment_name == "e1"
    p.write_text("tracking_url: oops\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="tracking_url"):
        load_mlflow_settings(p)


def test_flatten_uses_dots() -> None:
    flat = flatten(load_config(None).model_dump(mode="json"))
    assert flat["models.als.factors"] == 64
    assert "ingest.source.path" in flat


def test_redact_uri_hides_secrets_and_keeps_paths() -> None:
    from recsys_embed.tracking.tracker import redact_uri

    assert redact_uri("sqlite:////abs/path/mlflow.db") == "sqlite:////abs/path/mlflow.db"
    assert redact_uri("http://alice:s3cret@host:5000/") == "http://alice:***@host:5000/"
    assert "s3cret" not in redact_uri("postgresql://u:s3cret@db/x?password=s3cret&sslmode=require")
