"""The standalone registered recommender (``served_model``): the export's ranking including ties, IDs given as ints
or strings, the popularity fallback, the ALS fold-in against implicit's own ``recalculate_user``, and the EASE
fold-in (a history's X row times B)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_embed.config import ExportConfig, MlflowSettings
from recsys_embed.evaluation.topk import topk
from recsys_embed.models import ease
from recsys_embed.serving import coverage
from recsys_embed.serving.registry import ServedInputs, served_embeddings, served_inputs, write_served_bundle
from recsys_embed.serving.served_model import ServedRecommender, fold_in
from recsys_embed.store import save_csr, save_embeddings
from recsys_embed.types import Candidate, Embeddings, IdMap

N_USERS, N_ITEMS, D = 60, 40, 4


def _tied_embeddings() -> tuple[Embeddings, sp.csr_matrix]:
    """Small-integer vectors (exact float32 dot products) with planted ties: items 3 and 7 share a vector, items
    10..14 are zero (every user ties them at 0), users 0 and 1 are zero (they tie every item)."""
    rng = np.random.default_rng(3)
    uvec = rng.integers(-2, 3, (N_USERS, D)).astype(np.float32)
    ivec = rng.integers(-2, 3, (N_ITEMS, D)).astype(np.float32)
    ivec[7] = ivec[3]
    ivec[10:15] = 0.0
    uvec[:2] = 0.0
    users = IdMap(pl.Series("id", np.arange(1000, 1000 + N_USERS), dtype=pl.Int64))
    items = IdMap(pl.Series("id", [f"sku{i:03d}" for i in range(N_ITEMS)], dtype=pl.String))
    seen = sp.random(N_USERS, N_ITEMS, density=0.15, format="csr", random_state=4, dtype=np.float32)
    seen.data[:] = 1.0
    return Embeddings(uvec, ivec, users, items, "als"), seen


def _served(tmp_path: Path, inputs: ServedInputs, export_cfg: ExportConfig | None = None, k: int = 10
            ) -> ServedRecommender:  # fmt: skip
    folder = write_served_bundle(tmp_path / "bundle", inputs, export_cfg or ExportConfig(), k)
    return ServedRecommender().load(folder)


@pytest.mark.parametrize("allow_deny", [False, True])
def test_answers_equal_the_scorer_including_ties(tmp_path: Path, allow_deny: bool) -> None:
    emb, seen = _tied_embeddings()
    cfg = ExportConfig()
    allow = deny = None
    if allow_deny:  # the export's allow/deny lists apply to the served answers too
        cfg = ExportConfig(allow_items=[f"sku{i:03d}" for i in range(0, N_ITEMS, 2)] + ["sku003", "sku007"],
                           deny_items=["sku004"])  # fmt: skip
        allow = emb.items.lookup(pl.Series(cfg.allow_items)).to_numpy()
        deny = emb.items.lookup(pl.Series(cfg.deny_items)).to_numpy()
    k = 12
    model = _served(tmp_path, ServedInputs(emb, seen), cfg, k)
    want = topk(emb, k, seen=seen, allow_items=allow, deny_items=deny)
    got = model.recommend(pd.DataFrame({"user_id": emb.users.ids.to_list()}))
    assert list(got.columns) == ["user_id", "item_ids", "scores", "source"]
    n_ties = 0
    for u in range(N_USERS):
        ok = want.items[u] >= 0
        assert got.item_ids[u] == emb.items.decode(want.items[u][ok]).to_list(), u
        assert got.scores[u] == want.scores[u][ok].astype(float).tolist(), u  # exact, not approximate
        sc = want.scores[u][ok]
        n_ties += int(np.sum(sc[1:] == sc[:-1]))
        assert not set(got.item_ids[u]) & set(emb.items.decode(seen[u].indices).to_list())
    assert n_ties > 20  # the planted ties are really exercised
    assert set(got.source) == {"model"}
    # zero users tie every item: they get the first k admissible unseen items in index order
    first = [i for i in range(N_ITEMS) if i not in set(seen[0].indices) and (allow is None or i in set(allow))
             and (deny is None or i not in set(deny))][:k]  # fmt: skip
    assert got.item_ids[0] == [f"sku{i:03d}" for i in first]


def test_ids_as_ints_strings_and_unknown_users(tmp_path: Path) -> None:
    emb, seen = _tied_embeddings()
    popularity = np.arange(N_ITEMS, dtype=np.float64) % 7  # ties between items of equal popularity
    fallback = np.zeros(N_USERS, dtype=bool)
    fallback[5] = True
    model = _served(tmp_path, ServedInputs(emb, seen, fallback=fallback, popularity=popularity), k=5)
    ints = model.recommend(pd.DataFrame({"user_id": [1010, 1005, 1011]}))
    strs = model.recommend(pd.DataFrame({"user_id": ["1010", "1005", "1011"]}))
    floats = model.recommend(pd.DataFrame({"user_id": [1010.0, 1005.0, 1011.0]}))
    assert ints.item_ids.tolist() == strs.item_ids.tolist() == floats.item_ids.tolist()
    assert ints.user_id.tolist() == [1010, 1005, 1011] and strs.user_id.tolist() == ["1010", "1005", "1011"]
    assert ints.source.tolist() == ["model", "fallback", "model"]  # user 1005 is flagged as a fallback user
    assert all(len(x) == 5 for x in ints.item_ids)
    # unknown users (wrong ID, non-integral, text) get the popularity top-k, flagged, never an empty list
    cold = model.recommend(pd.DataFrame({"user_id": ["nobody", 99999, 1010.5, None]}), k=4)
    want = sorted(range(N_ITEMS), key=lambda i: (-popularity[i], i))[:4]  # ties by the lower index
    assert cold.item_ids.tolist() == [[f"sku{i:03d}" for i in want]] * 4
    assert cold.scores[0] == [float(popularity[i]) for i in want]
    assert set(cold.source) == {"fallback"}
    # history items are never recommended, to known and unknown users alike
    histories = [ints.item_ids[0][:2], [f"sku{want[0]:03d}"]]
    hist = model.recommend(pd.DataFrame({"user_id": [1010, "nobody"], "history": histories}))
    assert not set(hist.item_ids[0]) & set(ints.item_ids[0][:2]) and hist.item_ids[0][:3] == ints.item_ids[0][2:]
    assert f"sku{want[0]:03d}" not in hist.item_ids[1]


def test_string_user_ids_accept_ints(tmp_path: Path) -> None:
    emb, seen = _tied_embeddings()
    emb = Embeddings(emb.user_vectors, emb.item_vectors, IdMap(emb.users.ids.cast(pl.String)), emb.items, "bpr")
    model = _served(tmp_path, ServedInputs(emb, seen))
    assert model.recommend(pd.DataFrame({"user_id": [1010]})).item_ids[0] == model.recommend(
        pd.DataFrame({"user_id": ["1010"]})).item_ids[0]  # fmt: skip
    assert model.recommend(pd.DataFrame({"user_id": [1010]})).source[0] == "model"


def test_bad_input_names_the_fix(tmp_path: Path) -> None:
    emb, seen = _tied_embeddings()
    model = _served(tmp_path, ServedInputs(emb, seen))
    with pytest.raises(ValueError, match="lacks column 'user_id'"):
        model.recommend(pd.DataFrame({"user": [1]}))
    with pytest.raises(ValueError, match="list of item IDs"):
        model.recommend(pd.DataFrame({"user_id": [1010], "history": ["sku001"]}))


def test_fold_in_matches_implicit_recalculate_user(tmp_path: Path) -> None:
    import implicit.als
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    train = sp.random(80, 50, density=0.1, format="csr", random_state=1, dtype=np.float32)
    train.data = rng.integers(1, 4, train.nnz).astype(np.float32)
    alpha, reg = 8.0, 0.1
    with threadpool_limits(1, "blas"):  # implicit warns about a multi-threaded BLAS at construction
        als = implicit.als.AlternatingLeastSquares(factors=6, regularization=reg, alpha=alpha, iterations=5,
                                                   use_gpu=False, random_state=0)  # fmt: skip
        als.fit(train, show_progress=False)
    y = np.asarray(als.item_factors)
    yty = y.astype(np.float64).T @ y.astype(np.float64)
    # a new user: items 3 (twice), 7, 20
    row = sp.csr_matrix((np.array([2.0, 1.0, 1.0], np.float32), ([0, 0, 0], [3, 7, 20])), shape=(1, 50))
    want = als.recalculate_user(0, row)
    got = fold_in(y, yty, np.array([3, 7, 20]), np.array([2.0, 1.0, 1.0]), alpha, reg)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
    # a known user: its train row plus the new items, as implicit computes it from the combined row
    combined = train[5] + row
    want5 = als.recalculate_user(0, sp.csr_matrix(combined))

    users = IdMap(pl.Series("id", [f"u{i}" for i in range(80)]))
    items = IdMap(pl.Series("id", np.arange(50), dtype=pl.Int64))
    emb = Embeddings(np.asarray(als.user_factors), y, users, items, "als")
    fallback = np.zeros(80, dtype=bool)
    fallback[5] = True  # u5 is a fallback user of the production refit, until a history folds it in
    # no "kind": the fold_in of bundles written before EASE's fold-in, still read as ALS's
    inputs = ServedInputs(emb, train, fallback=fallback, fold_in={"alpha": alpha, "regularization": reg})
    model = _served(tmp_path, inputs, k=50)
    out = model.recommend(pd.DataFrame({"user_id": ["new", "u5"], "history": [[3, 3, 7, 20], [3, 3, 7, 20]]}))
    assert out.source.tolist() == ["model", "model"]  # a folded-in user is answered by the model
    plain = model.recommend(pd.DataFrame({"user_id": ["u5", "u5"], "history": [None, ["not-an-item"]]}))
    assert plain.source.tolist() == ["fallback", "fallback"]  # nothing to fold in: the flag stands
    for r, vec, seen_items in ((0, want, {3, 7, 20}), (1, want5, set(combined.indices))):
        scores = y @ vec
        order = [i for i in np.argsort(-scores, kind="stable") if i not in seen_items]
        assert out.item_ids[r] == order  # all unseen items, in implicit's vector's order
        np.testing.assert_allclose(out.scores[r], scores[order], rtol=1e-3, atol=1e-4)


def test_served_embeddings_round_trip(tmp_path: Path) -> None:
    """The registry re-scores a champion from its bundle: the vectors and ID maps come back unchanged."""
    emb, seen = _tied_embeddings()
    model = _served(tmp_path, ServedInputs(emb, seen))

    class Loaded:  # what mlflow.pyfunc.load_model returns, as far as served_embeddings looks
        def unwrap_python_model(self) -> ServedRecommender:
            return model

    back = served_embeddings(Loaded())
    assert back.users.ids.to_list() == emb.users.ids.to_list() and back.users.dtype == pl.Int64
    assert back.items.ids.to_list() == emb.items.ids.to_list()
    np.testing.assert_array_equal(back.user_vectors, emb.user_vectors)
    np.testing.assert_array_equal(back.item_vectors, emb.item_vectors)


def test_served_model_imports_no_project_code() -> None:
    """The model file must load where recsys-embed is not installed: it imports only these."""
    import recsys_embed.serving.served_model as sm

    tree = ast.parse(Path(sm.__file__).read_text(encoding="utf-8"))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "json", "pathlib", "typing", "mlflow", "numpy", "pandas", "pyarrow", "scipy"}


def test_recommend_vectors_is_the_scorer_for_outside_vectors(tmp_path: Path) -> None:
    """The two-tower fold-in entry point: vectors from elsewhere (its encoder) ranked like stored users."""
    emb, seen = _tied_embeddings()
    model = _served(tmp_path, ServedInputs(emb, seen))
    users = [1010, 1020, 1030]
    stored = model.recommend(pd.DataFrame({"user_id": users}))
    rows = [u - 1000 for u in users]
    hist = [emb.items.decode(seen[r].indices).to_list() for r in rows]  # the same seen items, given as history
    outside = model.recommend_vectors(emb.user_vectors[rows], histories=hist)
    assert outside.item_ids.tolist() == stored.item_ids.tolist()
    assert outside.scores.tolist() == stored.scores.tolist()
    with pytest.raises(ValueError, match="columns"):
        model.recommend_vectors(np.zeros((1, D + 1), dtype=np.float32))


# A tiny EASE model, as ``ease.embeddings`` represents it: user vectors are the rows of X (n_items wide), item
# vectors are B's columns (item_vectors = B.T), so a user's scores are X[u] @ B. Items 10..14, diag(B) = 0.
_B = np.array([[0, 1, 0, 3, 0],
               [1, 0, 2, 0, 4],
               [0, 0, 0, 1, 1],
               [2, 0, 1, 0, 0],
               [0, 1, 1, 0, 0]], dtype=np.float32)  # fmt: skip
_X = np.array([[1, 0, 0, 0, 0],   # u0
               [0, 1, 1, 0, 0],   # u1
               [0, 0, 0, 1, 1]],  # u2
              dtype=np.float32)  # fmt: skip
_POPULARITY = np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # the fallback ranks 10, 11, 12, 13, 14


def _ease_served(tmp_path: Path, info: dict[str, object]) -> ServedRecommender:
    """The EASE model above shipped as the pipeline ships it: ``coverage.served_embeddings`` (u3 has a kept event
    on item 12 but no model row: a fallback user), ``registry.served_inputs`` from the saved files, the bundle."""
    items = IdMap(pl.Series("id", [10, 11, 12, 13, 14], dtype=pl.Int64))
    model = Embeddings(_X, _B.T, IdMap(pl.Series("id", ["u0", "u1", "u2"])), items, "ease", info=info)
    users = IdMap(pl.Series("id", ["u0", "u1", "u2", "u3"]))
    served = coverage.served_embeddings(model, _POPULARITY, users, sp.csr_matrix(_X))
    seen = sp.csr_matrix(np.vstack([_X, [[0, 0, 1, 0, 0]]]))  # every kept (user, item) pair
    cand = Candidate("ease", "run", "parent", str(save_embeddings(served, tmp_path / "emb")),
                     str(save_csr(seen, tmp_path / "seen.npz")), {})  # fmt: skip
    inputs = served_inputs(cand, MlflowSettings())  # EASE's fold-in needs no MLflow run
    assert inputs.fold_in is not None and inputs.fold_in["kind"] == "ease"
    return _served(tmp_path, inputs, k=5)


@pytest.mark.parametrize(
    ("info", "want_items", "want_scores"),
    [
        # binary X: history [10, 10, 11] -> x = [1, 1, 0, 0, 0]; x @ B = B[0] + B[1] = [1, 1, 2, 3, 4];
        # 10 and 11 are in the history: 14 (4), 13 (3), 12 (2)
        ({"binary": True, "half_life_days": None}, [14, 13, 12], [4.0, 3.0, 2.0]),
        # recency-weighted X: a history has no timestamps, its items count as bought now (1.0): as binary
        ({"binary": True, "half_life_days": 60.0}, [14, 13, 12], [4.0, 3.0, 2.0]),
        ({"binary": False, "half_life_days": 60.0}, [14, 13, 12], [4.0, 3.0, 2.0]),
        # confidence X: 1 per listing -> x = [2, 1, 0, 0, 0]; 2 B[0] + B[1] = [1, 2, 2, 6, 4]: 13 (6), 14 (4), 12 (2)
        ({"binary": False, "half_life_days": None}, [13, 14, 12], [6.0, 4.0, 2.0]),
    ],
)
def test_ease_folds_in_a_new_users_history(
    tmp_path: Path, info: dict[str, object], want_items: list[int], want_scores: list[float]
) -> None:
    """Issue 19 item 6: an EASE champion answered a new user's history with the popularity fallback."""
    model = _ease_served(tmp_path, info)
    out = model.recommend(pd.DataFrame({
        "user_id": ["new", "new", "u2", "u3", "u3"],
        "history": [[10, 10, 11], None, [10], [12, 10], None],
    }))  # fmt: skip
    assert out.item_ids[0] == want_items and out.scores[0] == want_scores and out.source[0] == "model"
    assert out.item_ids[1] == [10, 11, 12, 13, 14] and out.source[1] == "fallback"  # no history: popularity
    assert out.item_ids[0] != [i for i in out.item_ids[1] if i not in (10, 11)]  # not the fallback's order
    # u2's stored row [0, 0, 0, 1, 1] plus 10 -> x = [1, 0, 0, 1, 1]; B[0] + B[3] + B[4] = [2, 2, 2, 3, 0]; 10, 13,
    # 14 are seen or listed: 11 (2), 12 (2), the tie by the lower index
    assert out.item_ids[2] == [11, 12] and out.scores[2] == [2.0, 2.0] and out.source[2] == "model"
    # u3 is a fallback user (no model row): its history folds it in from zeros, its seen item 12 stays out;
    # x = [1, 0, 1, 0, 0] (12 listed too); B[0] + B[2] = [0, 1, 0, 4, 1]: 13 (4), 11 (1), 14 (1)
    assert out.item_ids[3] == [13, 11, 14] and out.scores[3] == [4.0, 1.0, 1.0] and out.source[3] == "model"
    assert out.source[4] == "fallback"


def test_ease_fold_in_of_a_users_own_items_is_its_stored_answer(tmp_path: Path) -> None:
    """On a fitted B: a new user whose history is a known user's train items gets that user's answers exactly."""
    rng = np.random.default_rng(5)
    x = (rng.random((30, 25)) < 0.2).astype(np.float32)
    b = ease.weights(ease.gram(sp.csr_matrix(x, dtype=np.float64)), 5.0)
    items = IdMap(pl.Series("id", [f"i{i}" for i in range(25)]))
    emb = Embeddings(x, b.T, IdMap(pl.Series("id", np.arange(30), dtype=pl.Int64)), items, "ease")
    model = _served(tmp_path, ServedInputs(emb, sp.csr_matrix(x), fold_in={"kind": "ease", "binary": True}), k=8)
    users = [u for u in range(30) if x[u].any()][:10]
    hist = [[f"i{i}" for i in np.flatnonzero(x[u])] for u in users]
    stored = model.recommend(pd.DataFrame({"user_id": users}))
    new = model.recommend(pd.DataFrame({"user_id": [f"new{u}" for u in users], "history": hist}))
    assert new.item_ids.tolist() == stored.item_ids.tolist() and new.scores.tolist() == stored.scores.tolist()
    assert set(new.source) == {"model"}


def test_ease_fold_in_needs_rows_of_x(tmp_path: Path) -> None:
    emb, seen = _tied_embeddings()  # d = 4 factors, not n_items wide
    with pytest.raises(ValueError, match="rows of X"):
        _served(tmp_path, ServedInputs(emb, seen, fold_in={"kind": "ease", "binary": True}))
    with pytest.raises(ValueError, match="kind 'knn' is unknown"):
        _served(tmp_path, ServedInputs(emb, seen, fold_in={"kind": "knn"}))


@pytest.mark.parametrize("confidence", ["log1p", "bm25"])
def test_als_fold_in_applies_the_confidence_transform_it_was_fitted_on(tmp_path: Path, confidence: str) -> None:
    """Issue 19.5: an ALS fitted on log1p / BM25 confidence folds a history in on the same scale: the served vector
    of a known user with new items equals implicit's ``recalculate_user`` on the transformed combined row."""
    import implicit.als
    from threadpoolctl import threadpool_limits

    from recsys_embed.models.mf import transform_confidence

    rng = np.random.default_rng(2)
    raw = sp.random(80, 50, density=0.1, format="csr", random_state=3, dtype=np.float32)
    raw.data = rng.integers(1, 400, raw.nnz).astype(np.float32)  # play counts
    fitted = transform_confidence(raw, confidence)
    alpha, reg = 4.0, 0.1
    with threadpool_limits(1, "blas"):
        als = implicit.als.AlternatingLeastSquares(factors=6, regularization=reg, alpha=alpha, iterations=5,
                                                   use_gpu=False, random_state=0)  # fmt: skip
        als.fit(fitted, show_progress=False)
    y = np.asarray(als.item_factors)
    users = IdMap(pl.Series("id", [f"u{i}" for i in range(80)]))
    items = IdMap(pl.Series("id", np.arange(50), dtype=pl.Int64))
    emb = Embeddings(np.asarray(als.user_factors), y, users, items, "als")
    fold = {"kind": "als", "alpha": alpha, "regularization": reg, "confidence": confidence, "bm25_k1": 100.0,
            "bm25_b": 0.8}
    model = _served(tmp_path, ServedInputs(emb, raw, fold_in=fold), k=50)  # seen: the stored counts
    # user 5's own counts: BM25's item lengths and idf from the stored counts reproduce the fitted scale
    want = als.recalculate_user(0, fitted[5])
    np.testing.assert_allclose(model._fold_in(5, np.array([], dtype=np.int64)), want, rtol=1e-3, atol=1e-5)
    if confidence == "log1p":  # per pair: new listings add to the counts, then log1p, as a refit would see them
        new = sp.csr_matrix((np.array([2.0, 1.0], np.float32), ([0, 0], [3, 20])), shape=(1, 50))
        want_new = als.recalculate_user(0, transform_confidence(sp.csr_matrix(raw[5] + new), "log1p"))
        np.testing.assert_allclose(model._fold_in(5, np.array([3, 3, 20])), want_new, rtol=1e-3, atol=1e-5)
        out = model.recommend(pd.DataFrame({"user_id": ["u5"], "history": [[3, 3, 20]]}))
        assert out.source.tolist() == ["model"]
    # and a raw-count fold-in would be another vector: the transform matters
    assert not np.allclose(fold_in(y, y.astype(np.float64).T @ y, raw[5].indices, raw[5].data, alpha, reg), want,
                           rtol=1e-2)  # fmt: skip


def test_answers_carry_item_texts_and_mostly_zero_factors_are_compressed(tmp_path: Path) -> None:
    """The served model answers with the log's item texts beside the IDs (the export's ``item_text``), and a
    factor matrix that is mostly zeros (EASE's user rows of X) is stored compressed and loads back exactly."""
    emb, seen = _tied_embeddings()
    uvec = emb.user_vectors.copy()
    uvec[5:] = 0.0  # 55 of 60 users all zero: more than half of the entries
    emb = Embeddings(uvec, emb.item_vectors, emb.users, emb.items, "als")
    texts = tmp_path / "item_text.parquet"
    pl.DataFrame({"item_id": ["sku000", "sku001", "sku002"], "text": ["MUG", "CUP", None]}).write_parquet(texts)
    model = _served(tmp_path, ServedInputs(emb, seen, item_text=str(texts)))
    bundle = tmp_path / "bundle"
    assert (bundle / "user_factors.npz").exists() and not (bundle / "user_factors.npy").exists()
    assert (bundle / "item_factors.npy").exists()  # dense: stored as is
    np.testing.assert_array_equal(model.user_factors, uvec)
    out = model.recommend(pd.DataFrame({"user_id": [1002, 1003, 424242]}), k=N_ITEMS)
    assert list(out.columns) == ["user_id", "item_ids", "item_texts", "scores", "source"]
    names = {"sku000": "MUG", "sku001": "CUP"}
    for items, item_texts in zip(out["item_ids"], out["item_texts"], strict=True):
        assert len(items) == len(item_texts) > 0
        assert item_texts == [names.get(i) for i in items]
    plain = _served(tmp_path / "plain", ServedInputs(emb, seen))
    assert "item_texts" not in plain.recommend(pd.DataFrame({"user_id": [1002]}), k=5).columns
