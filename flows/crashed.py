"""Mark Prefect flow runs that a killed process left RUNNING as CRASHED, so no dead run holds a deployment's
concurrency slot or shows as running forever.

A run that is SIGKILLed (or loses its machine) cannot report its own end. Prefect covers part of it: a runner
(``recsys-embed serve``) that outlives its flow-run process marks that run crashed, and the deployment
concurrency lease of a run that stops renewing it expires (300 s) and frees the slot. Nothing marks the run
itself when the whole process tree died, or when ``recsys-embed run`` or ``recsys-embed backtest`` was killed.
The next run of the same flow and output folder does, with two tags per flow run:

- ``start_tag(root, kind)`` and ``process_tag()`` at once, as the flow starts (``claim_root``, before its slow
  start-up: the MLflow check, the lock): the folder it runs for and the process it runs in (host, PID namespace,
  pid, process start time, so a reused pid is not taken for the dead process);
- ``root_tag(root, kind)`` once it holds the folder's lock (``mark_dead_runs_crashed``).

Holding the lock, the next run marks CRASHED every other RUNNING flow run of its kind and folder that held the
lock (``root_tag``; it can no longer hold it, so it is dead) or of the same deployment that started before it,
unless its process is visibly alive on this host; and every one that only claimed the folder (killed before the
lock) whose process is visibly gone. A run whose process cannot be checked (another host or PID namespace) and
that never held the lock is left alone: it may be live and about to find the lock taken. Runs of other
folders, or of the other kind, are never looked at. ``kind``: ``"run"`` for the main flow (the lock
``<root>/.run.lock``), ``"backtest"`` for the backtest flow (its own lock ``<root>/.backtest/.run.lock``,
held for the whole backtest, while its pipeline subflows take the folder's run lock in turn).

Setting the Crashed state also releases any concurrency slot the dead run still held (Prefect's
``ReleaseFlowConcurrencySlots`` transform applies to every state change); when Prefect had already taken the slot
back (the lease expired), that release would free a live run's slot, so the slot is occupied again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["run", "backtest"]
_HELD = {"run": "recsys-embed-root", "backtest": "recsys-embed-backtest"}
_STARTED = {"run": "recsys-embed-start", "backtest": "recsys-embed-backtest-start"}
PROCESS_PREFIX = "recsys-embed-proc:"


def _root_id(root: Path) -> str:
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return f"{Path(root).name}:{digest}"


def root_tag(root: Path, kind: Kind = "run") -> str:
    """The flow-run tag of ``kind`` runs that held ``root``'s lock: ``recsys-embed-root:<name>:<hash of the path>``
    (``recsys-embed-backtest:...`` for backtests)."""
    return f"{_HELD[kind]}:{_root_id(root)}"


def start_tag(root: Path, kind: Kind = "run") -> str:
    """The flow-run tag of ``kind`` runs started for ``root`` (set before they take its lock)."""
    return f"{_STARTED[kind]}:{_root_id(root)}"


def process_tag(pid: int | None = None) -> str:
    """``recsys-embed-proc:<host>:<pid namespace>:<pid>:<process start time>`` of process ``pid`` (default: this
    one); ``-`` for what the system does not tell (no ``/proc``)."""
    pid = os.getpid() if pid is None else pid
    stat = _stat(pid)
    return f"{PROCESS_PREFIX}{socket.gethostname()}:{_pid_namespace()}:{pid}:{stat[1] if stat else '-'}"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "-"


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from ``/proc/<pid>/stat``; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return (fields[0], fields[19]) if len(fields) > 19 else None


def process_gone(tags: list[str]) -> bool | None:
    """Whether the process named by a ``process_tag`` among ``tags`` has ended: True (gone, a zombie, or its pid
    now belongs to a later process), False (running), None (no such tag, or another host or PID namespace)."""
    found = next((t for t in tags if t.startswith(PROCESS_PREFIX)), None)
    if found is None:
        return None
    try:
        host, namespace, pid_text, start = found[len(PROCESS_PREFIX) :].rsplit(":", 3)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != socket.gethostname() or namespace != _pid_namespace():
        return None
    if namespace != "-":  # Linux: /proc tells a zombie and a reused pid apart
        stat = _stat(pid)
        return stat is None or stat[0] in ("Z", "X") or (start != "-" and stat[1] != start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists (another user's)
        return False
    return False


def claim_root(root: Path, kind: Kind = "run") -> None:
    """Tag the current flow run with ``start_tag(root, kind)`` and ``process_tag()`` (one update, at the flow's
    start), so the next run can tell it dead if this process is killed before it holds the lock. Best effort."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    try:
        with get_client(sync_client=True) as client:
            _add_tags(client, ctx.flow_run.id, [start_tag(root, kind), process_tag()])
    except Exception as e:  # housekeeping must never fail the run
        log.warning("could not tag flow run '%s' with its output folder (%s: %s); the run goes on",
                    ctx.flow_run.name, type(e).__name__, e)  # fmt: skip


def _add_tags(client: Any, run_id: Any, tags: list[str]) -> Any:
    """Add ``tags`` to flow run ``run_id`` (Prefect replaces the whole list); returns the run as read before."""
    run = client.read_flow_run(run_id)
    missing = [t for t in tags if t not in run.tags]
    if missing:
        client.update_flow_run(run_id, tags=[*run.tags, *missing])
    return run


def mark_dead_runs_crashed(root: Path, kind: Kind = "run") -> list[str]:
    """Tag the current flow run with ``root_tag(root, kind)`` and mark CRASHED the other RUNNING ``kind`` flow runs
    of ``root`` that are dead (see the module doc); returns their names.

    Call only while holding ``root``'s lock of ``kind`` (``recsys_embed.pipeline.lock.run_lock`` on ``root``, or on
    ``root / ".backtest"`` for a backtest). Best effort: a Prefect API error is logged and the run goes on.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext
    from prefect.states import Crashed

    ctx = FlowRunContext.get()
    me = ctx.flow_run if ctx is not None else None
    if me is None:
        return []
    held, started = root_tag(root, kind), start_tag(root, kind)
    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    marked: list[str] = []
    try:
        with get_client(sync_client=True) as client:
            mine = _add_tags(client, me.id, [held, process_tag()])

            def tagged(tag: str) -> dict[Any, Any]:
                return {r.id: r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=running, tags=FlowRunFilterTags(all_=[tag])))}  # fmt: skip

            # held the lock, or an earlier run of this deployment: dead unless its process is seen alive here
            dead = {i: r for i, r in tagged(held).items() if process_gone(r.tags) is not False}
            if me.deployment_id is not None:
                same_deployment = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=running, deployment_id=FlowRunFilterDeploymentId(any_=[me.deployment_id])))  # fmt: skip
                dead |= {r.id: r for r in same_deployment
                         if (mine.start_time is None or (r.start_time is not None and r.start_time < mine.start_time))
                         and process_gone(r.tags) is not False}  # fmt: skip
            # started for this folder, killed before the lock: dead only if its process is seen gone
            dead |= {i: r for i, r in tagged(started).items() if process_gone(r.tags) is True}
            dead.pop(me.id, None)
            lock = f"{root}/.backtest/.run.lock" if kind == "backtest" else f"{root}/.run.lock"
            why = f"left RUNNING by a killed process; marked crashed by flow run '{me.name}' (holding {lock})"
            for run in dead.values():
                repossessed = _lease_expired(client, run)
                client.set_flow_run_state(run.id, Crashed(message=why), force=True)
                if repossessed:
                    _restore_slot(client, run)
                marked.append(run.name)
    except Exception as e:  # housekeeping must never fail the run
        log.warning("could not mark dead flow runs crashed (%s: %s); the run goes on", type(e).__name__, e)
    return marked


def _lease_expired(client: Any, run: Any) -> bool:
    """Whether ``run`` held a deployment concurrency lease that Prefect already took back (it expired)."""
    import httpx

    lease_id = run.state.state_details.deployment_concurrency_lease_id if run.state is not None else None
    if run.deployment_id is None or lease_id is None:
        return False
    try:
        client.renew_concurrency_lease(lease_id, lease_duration=60)  # alive: the Crashed state releases it
    except httpx.HTTPStatusError as e:
        return e.response.status_code in (404, 410)
    return False


def _restore_slot(client: Any, run: Any) -> None:
    """Undo the extra release of a repossessed slot.

    Leaving RUNNING always releases one deployment slot, and when the run's lease is gone Prefect releases one
    without a lease; but the expired lease's slot was released already, so this one was taken from a live run
    (typically the one marking). Occupying one slot again keeps the count equal to the live runs.
    """
    limit = client.read_deployment(run.deployment_id).global_concurrency_limit
    if limit is None:
        return
    try:
        client.increment_concurrency_slots(names=[limit.name], slots=1, mode="concurrency")
    except Exception as e:  # a new run took the freed slot in between: the output lock still keeps them apart
        log.warning("could not re-occupy the concurrency slot of '%s' (%s)", limit.name, e)
