"""Disk full and permission denied at export (issue 7): one clear error naming the path and what to do, and the
previous export stays intact and readable.

The tests run as root here, so chmod alone denies nothing: a full disk is a subprocess under
``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored (writes past the limit fail with EFBIG, as on a full quota); a denied
permission is a subprocess that drops to user ``nobody`` (after its imports, which live under /root) and writes
into a root-owned folder; a location the kernel refuses is a folder under /sys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_embed.config import ExportConfig
from recsys_embed.errors import OutputError
from recsys_embed.io import is_complete_table, read_table, write_json_atomic
from recsys_embed.serving.export import export_topk
from recsys_embed.types import Embeddings, IdMap

REPO = Path(__file__).resolve().parents[2]
CFG = {"k": 20, "chunk_users": 500, "write_csv": True}

# Builds the same embeddings as _emb() in a fresh interpreter, then runs ``ACTION`` and prints what happened.
SCRIPT = """
import json, os, resource, signal, sys
import numpy as np, polars as pl
from recsys_embed.config import ExportConfig
from recsys_embed.errors import OutputError
from recsys_embed.serving.export import export_topk
from recsys_embed.io import write_json_atomic
from recsys_embed.types import Embeddings, IdMap

out, mode, warm = sys.argv[1], sys.argv[2], sys.argv[3]
rng = np.random.default_rng(0)
n_users, n_items = 3000, 400
emb = Embeddings(rng.standard_normal((n_users, 8)), rng.standard_normal((n_items, 8)),
                 IdMap(pl.Series("id", [f"u{i}" for i in range(n_users)])),
                 IdMap(pl.Series("id", [f"i{i}" for i in range(n_items)])), model="als")
cfg = ExportConfig.model_validate(json.loads(sys.argv[4]))
export_topk(emb, None, cfg, warm, "warm-up")  # loads every lazy import while the process may still read them
write_json_atomic({"warm": 1}, os.path.join(warm, "m.json"))
if mode == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))
elif mode == "nobody":
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
result = {}
for what, action in (("export", lambda: export_topk(emb, None, cfg, out, "run-new")),
                     ("manifest", lambda: write_json_atomic({"k": "v" * 100_000}, os.path.join(out, "summary.json")))):
    try:
        action()
        result[what] = {"error": None}
    except OutputError as e:
        result[what] = {"error": "OutputError", "message": str(e), "errno": e.errno,
                        "is_oserror": isinstance(e, OSError)}
    except BaseException as e:
        result[what] = {"error": type(e).__name__, "message": str(e)}
print("RESULT " + json.dumps(result))
"""


def _emb() -> Embeddings:
    rng = np.random.default_rng(0)
    n_users, n_items = 3000, 400
    return Embeddings(
        rng.standard_normal((n_users, 8)),
        rng.standard_normal((n_items, 8)),
        IdMap(pl.Series("id", [f"u{i}" for i in range(n_users)])),
        IdMap(pl.Series("id", [f"i{i}" for i in range(n_items)])),
        model="als",
    )


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A root-owned 0755 folder outside pytest's 0700 tmp tree, so user nobody can reach (not write) it."""
    d = Path(tempfile.mkdtemp(prefix="recsys-export-perm-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _previous_export(out: Path) -> tuple[pl.DataFrame, bytes]:
    res = export_topk(_emb(), None, ExportConfig.model_validate(CFG), out, "run-old")
    write_json_atomic({"run": "old"}, out / "summary.json")
    return read_table(res.path), (out / "topk.csv").read_bytes()


def _run(out: Path, mode: str, warm: Path) -> dict[str, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), mode, str(warm), json.dumps(CFG)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env, check=False,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    result: dict[str, dict[str, object]] = json.loads(lines[-1][len("RESULT ") :])
    return result


def _assert_previous_intact(out: Path, before: pl.DataFrame, csv_before: bytes) -> None:
    assert is_complete_table(out / "topk")
    after = read_table(out / "topk")
    assert after.equals(before) and (after["run_id"] == "run-old").all()
    assert (out / "topk.csv").read_bytes() == csv_before
    assert json.loads((out / "summary.json").read_text()) == {"run": "old"}
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "topk", "topk.csv"]  # no staging or temp files


def test_disk_full_is_one_clear_error_and_the_previous_export_stays(tmp_path: Path) -> None:
    out = tmp_path / "exports"
    before, csv_before = _previous_export(out)
    (tmp_path / "warm").mkdir()
    result = _run(out, "fsize", tmp_path / "warm")
    for what, target in (("export", out / "topk"), ("manifest", out / "summary.json")):
        r = result[what]
        assert r["error"] == "OutputError" and r["is_oserror"] is True and r["errno"] == 27, r
        msg = str(r["message"])
        assert "\n" not in msg and f"'{target}'" in msg, msg
        assert "File too large [EFBIG]" in msg and "free space" in msg and "output_root" in msg, msg
        assert "is unchanged" in msg
    _assert_previous_intact(out, before, csv_before)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to user nobody (as non-root, chmod suffices)")
def test_permission_denied_is_one_clear_error_and_the_previous_export_stays(world_readable_dir: Path) -> None:
    out = world_readable_dir / "exports"
    before, csv_before = _previous_export(out)
    for p in [out, *out.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # readable by nobody, writable by root only
    warm = world_readable_dir / "warm"
    warm.mkdir()
    shutil.chown(warm, "nobody")  # the warm-up export runs as root, but stay tidy for both
    result = _run(out, "nobody", warm)
    for what, target in (("export", out / "topk"), ("manifest", out / "summary.json")):
        r = result[what]
        assert r["error"] == "OutputError" and r["errno"] == 13, r
        msg = str(r["message"])
        assert "\n" not in msg and f"'{target}'" in msg, msg
        assert "Permission denied [EACCES]" in msg and "writable for user nobody" in msg, msg
    _assert_previous_intact(out, before, csv_before)


def test_a_location_the_kernel_refuses_is_one_clear_error() -> None:
    probe = Path("/sys/recsys-embed-probe")
    try:
        probe.mkdir()
    except OSError as e:
        refused = e.errno
    else:  # pragma: no cover - a writable /sys would be a strange machine
        probe.rmdir()
        pytest.skip("/sys accepts new folders here")
    with pytest.raises(OutputError) as err:
        export_topk(_emb(), None, ExportConfig(k=2), probe, "run")
    assert err.value.errno == refused and "\n" not in str(err.value)
    assert f"'{probe / 'topk'}'" in str(err.value) and ("output_root" in str(err.value))
