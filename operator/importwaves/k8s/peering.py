"""Whether the operator runs with kopf peering or standalone.

kopf pauses, silently, an operator whose peering object does not exist (no `ClusterKopfPeering`
for a cluster-wide operator, no `KopfPeering` in a watched namespace): its ImportJobs never get a
status or an Event. `importwaves run` checks first: a missing peering object means running
standalone, with a warning that says so and how to get peering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"


@dataclass(frozen=True)
class PeeringChoice:
    standalone: bool
    peering_name: str | None
    #: what to tell the user (None: nothing unusual)
    warning: str | None = None


def choose(
    standalone: bool, name: str, namespaces: Sequence[str], missing: Sequence[str]
) -> PeeringChoice:
    """`missing`: where the peering object `name` was not found ("cluster" for the cluster-wide
    one, else the namespaces); empty when it exists everywhere it is needed."""
    if standalone or not name:
        return PeeringChoice(True, None)
    if not missing:
        return PeeringChoice(False, name)
    where = (
        f"ClusterKopfPeering {name!r}"
        if not namespaces
        else f"KopfPeering {name!r} in namespace(s) {', '.join(missing)}"
    )
    return PeeringChoice(
        True,
        None,
        f"no {where}: running STANDALONE (no peering: a second operator instance would work "
        "on the same ImportJobs). Install the chart's peering object (crds/kopf-peering.yaml "
        "and templates/peering.yaml) for peering, or pass --standalone to silence this warning.",
    )


def missing_peering(name: str, namespaces: Sequence[str]) -> list[str]:
    """Where the peering object is missing (see `choose`), read from the cluster. A peering
    CRD that is not installed counts as missing."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi()
    missing: list[str] = []
    try:
        if not namespaces:
            api.get_cluster_custom_object(
                PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", name
            )
            return []
        for ns in namespaces:
            try:
                api.get_namespaced_custom_object(
                    PEERING_GROUP, PEERING_VERSION, ns, "kopfpeerings", name
                )
            except ApiException as exc:
                if exc.status == 403:
                    continue  # may not read it: cannot tell, so keep kopf's peering on
                if exc.status != 404:
                    raise
                missing.append(ns)
    except ApiException as exc:
        if exc.status == 403:
            return []  # may not read it: cannot tell, so keep kopf's peering on
        if exc.status != 404:
            raise
        return ["cluster"]
    return missing
