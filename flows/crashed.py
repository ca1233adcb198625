"""Mark Prefect flow runs that a killed process left RUNNING as CRASHED, so no dead run holds a deployment's
concurrency slot or shows as running forever.

A run that is SIGKILLed (or loses its machine) cannot report its own end. Prefect covers part of it: a runner
(``recsys-embed serve``) that outlives its flow-run process marks that run crashed, and the deployment
concurrency lease of a run that stops renewing it expires (300 s) and frees the slot. Nothing marks the run
itself when the whole process tree died, or when ``recsys-embed run`` was killed. The next run does: it holds
the output folder's run lock, so any other RUNNING flow run of the same pipeline and output folder (tagged
``root_tag`` once it held that lock) or of the same deployment (started before this one) is dead.
Setting the Crashed state also releases any concurrency slot the dead run still held (Prefect's
``ReleaseFlowConcurrencySlots`` transform applies to every state change); when Prefect had already taken the slot
back (the lease expired), that release would free a live run's slot, so the slot is occupied again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def root_tag(root: Path) -> str:
    """The flow-run tag of runs that held ``root``'s lock: ``recsys-embed-root:<name>:<hash of the path>``."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:10]
    return f"recsys-embed-root:{Path(root).name}:{digest}"


def mark_dead_runs_crashed(root: Path) -> list[str]:
    """Tag the current flow run with ``root_tag(root)`` and mark CRASHED every other RUNNING flow run with that
    tag or of the current run's deployment that started before it; returns their names.

    Call only while holding ``root``'s run lock (``recsys_embed.pipeline.lock.run_lock``). Best effort: a Prefect API
    error is logged and the run goes on.
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
    tag = root_tag(root)
    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    marked: list[str] = []
    try:
        with get_client(sync_client=True) as client:
            if tag not in me.tags:
                client.update_flow_run(me.id, tags=[*me.tags, tag])
            dead = {r.id: r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=running, tags=FlowRunFilterTags(all_=[tag])))}  # fmt: skip
            if me.deployment_id is not None:
                same_deployment = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=running, deployment_id=FlowRunFilterDeploymentId(any_=[me.deployment_id])))  # fmt: skip
                started = client.read_flow_run(me.id).start_time
                dead |= {r.id: r for r in same_deployment
                         if started is None or (r.start_time is not None and r.start_time < started)}  # fmt: skip
            dead.pop(me.id, None)
            why = f"left RUNNING by a killed process; marked crashed by flow run '{me.name}' (holding {root}/.run.lock)"
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
