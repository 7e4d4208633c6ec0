"""The local kubelet's container mode: a pod's first container as a podman container (runc).

`PodmanRuntime.prepare(...)` turns a pod (its container, env, volumes and security context) into
a `podman create` command, or raises `PodConfigError` with the reason and message a kubelet
would report (e.g. `CreateContainerConfigError: container has runAsNonRoot and image will run
as root ...`). `_PodRunner` (localkubelet.py) then runs `podman start --attach`, reads the exit
code and the termination message, and removes the container.

Honoured (checked by tests/e2e/test_chart_containers.py):
* image (local storage only: pull policy is never acted on; a missing image is ErrImageNeverPull
  or ErrImagePull), command/args with the Kubernetes semantics (command replaces ENTRYPOINT,
  args replace CMD), env (passed through podman's environment, never its argv), workingDir;
* securityContext, pod and container level merged like the kubelet does: runAsUser and
  runAsGroup (`--user`), runAsNonRoot (checked against runAsUser, else the image's numeric
  USER, with the kubelet's messages), fsGroup and supplementalGroups (`--group-add`; emptyDirs
  group-owned by fsGroup, setgid), readOnlyRootFilesystem (`--read-only`, no tmpfs added),
  capabilities drop/add, allowPrivilegeEscalation false (`no-new-privileges`), privileged,
  seccompProfile (RuntimeDefault: podman's default profile; Unconfined or unset: unconfined, as
  the kubelet's default; Localhost: a file under `<root>/seccomp/`);
* volumes: emptyDir (a 0777 directory, or tmpfs for medium Memory), secret, configMap,
  downwardAPI and projected (serviceAccountToken by TokenRequest bound to the pod, configMap,
  secret, downwardAPI): the ServiceAccount admission plugin's `kube-api-access-*` volume gives
  `/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt,namespace}` exactly when
  automountServiceAccountToken allows it;
* the termination message: a file bind-mounted at terminationMessagePath, read after exit
  (FallbackToLogsOnError: the log's tail when it is empty and the container failed);
* KUBERNETES_SERVICE_HOST/PORT point at the API server's real address (host networking: the
  pod reaches it on loopback, there is no kube-proxy).

Refused with a reason (never silently ignored): other volume types, seLinuxOptions,
appArmorProfile other than Unconfined, sysctls, procMount Unmasked, windowsOptions.
Not enforced: resource limits, probes, emptyDir sizeLimit, token refresh (tokens last their
expirationSeconds, an hour by default: longer than any test).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file")
LABEL = "io.importwaves.localkubelet"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class PodConfigError(Exception):
    """The container cannot be created as the pod asks: (reason, message) as a kubelet says."""

    def __init__(self, reason: str, message: str, *, retry: bool = False) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        #: Transient (a Secret that may appear): keep the pod Pending and retry.
        self.retry = retry


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}: {proc.stderr.strip()}")
    return proc


def format_pod(pod: dict[str, Any]) -> str:
    """The kubelet's format.Pod: name_namespace(uid)."""
    m = pod["metadata"]
    return f"{m['name']}_{m['namespace']}({m['uid']})"


def effective_security_context(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """Pod-level runAs*/seccomp/seLinux/appArmor/windows settings, overridden by the
    container's (securitycontext.DetermineEffectiveSecurityContext)."""
    psc = pod["spec"].get("securityContext") or {}
    out = {
        k: psc[k]
        for k in (
            "runAsUser",
            "runAsGroup",
            "runAsNonRoot",
            "seccompProfile",
            "seLinuxOptions",
            "appArmorProfile",
            "windowsOptions",
        )
        if psc.get(k) is not None
    }
    out.update({k: v for k, v in (container.get("securityContext") or {}).items() if v is not None})
    return out


def parse_image_user(user: str) -> tuple[int | None, str]:
    """The image's USER as (numeric uid or None, user name); '' is root (uid 0)."""
    name = (user or "").partition(":")[0]
    if not name:
        return 0, ""
    return (int(name), "") if name.isdigit() else (None, name)


def verify_run_as_non_root(
    pod: dict[str, Any], container: dict[str, Any], sc: dict[str, Any], image_user: str
) -> None:
    """kuberuntime's verifyRunAsNonRoot, with its messages."""
    if not sc.get("runAsNonRoot"):
        return
    where = f"(pod: {format_pod(pod)!r}, container: {container['name']})".replace("'", '"')
    if sc.get("runAsUser") is not None:
        if int(sc["runAsUser"]) == 0:
            raise PodConfigError(
                "CreateContainerConfigError",
                f"container's runAsUser breaks non-root policy {where}",
            )
        return
    uid, name = parse_image_user(image_user)
    if uid == 0:
        raise PodConfigError(
            "CreateContainerConfigError",
            f"container has runAsNonRoot and image will run as root {where}",
        )
    if uid is None:
        raise PodConfigError(
            "CreateContainerConfigError",
            f"container has runAsNonRoot and image has non-numeric user ({name}), cannot verify "
            f"user is non-root {where}",
        )


def security_args(
    pod: dict[str, Any], container: dict[str, Any], image_user: str, seccomp_root: Path
) -> list[str]:
    """podman flags for the effective security context (raises PodConfigError)."""
    sc = effective_security_context(pod, container)
    psc = pod["spec"].get("securityContext") or {}
    refuse = [k for k in ("seLinuxOptions", "windowsOptions") if sc.get(k)] + (
        ["sysctls"] if psc.get("sysctls") else []
    )
    if (sc.get("appArmorProfile") or {}).get("type", "Unconfined") != "Unconfined":
        refuse.append("appArmorProfile")
    if sc.get("procMount", "Default") != "Default":
        refuse.append("procMount")
    if refuse:
        raise PodConfigError(
            "CreateContainerConfigError",
            f"the local kubelet cannot honour securityContext {', '.join(sorted(refuse))}",
        )
    verify_run_as_non_root(pod, container, sc, image_user)
    args: list[str] = []
    uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
    if uid is not None or gid is not None:
        user = str(uid) if uid is not None else (image_user.partition(":")[0] or "0")
        if gid is not None:
            user += f":{gid}"
        # (runAsUser alone: the group comes from the image's /etc/passwd, else 0, as containerd
        # and podman both do.)
        args += ["--user", user]
    groups = [psc["fsGroup"]] if psc.get("fsGroup") is not None else []
    groups += list(psc.get("supplementalGroups") or [])
    for g in groups:
        args += ["--group-add", str(g)]
    if sc.get("readOnlyRootFilesystem"):
        # No tmpfs on /tmp, /var/tmp, /run either: only the pod's volumes are writable.
        args += ["--read-only", "--read-only-tmpfs=false"]
    if sc.get("privileged"):
        args.append("--privileged")
    caps = sc.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        args += ["--cap-drop", cap]
    for cap in caps.get("add") or []:
        args += ["--cap-add", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    profile = sc.get("seccompProfile") or {}
    kind = profile.get("type", "Unconfined")
    if kind == "RuntimeDefault":
        pass  # podman's default profile (containers-common's seccomp.json)
    elif kind == "Localhost":
        path = seccomp_root / str(profile.get("localhostProfile", ""))
        if not path.is_file():
            raise PodConfigError(
                "CreateContainerError",
                f"seccomp profile {profile.get('localhostProfile')!r} not found",
            )
        args += ["--security-opt", f"seccomp={path}"]
    else:
        args += ["--security-opt", "seccomp=unconfined"]
    return args


@dataclass
class Prepared:
    """What `podman create` needs, and where the pod's termination message lands."""

    argv: list[str]
    env: dict[str, str]
    termination_file: Path
    termination_policy: str
    image_id: str


@dataclass
class PodmanRuntime:
    """Container mode of the local kubelet. `core` is a CoreV1Api (Secrets, ConfigMaps,
    TokenRequest); `api_server` the API server URL as the kubelet's client sees it."""

    core: Any
    api_server: str
    root_dir: Path
    ulimit_nofile: int = 4096
    ulimit_nproc: int = 4096
    _images: dict[str, tuple[str, str]] = field(default_factory=dict)

    # images -------------------------------------------------------------------------------
    def image(self, ref: str, pull_policy: str) -> tuple[str, str]:
        """(image id, USER) of a local image; PodConfigError if it is not in local storage."""
        if ref not in self._images:
            proc = podman(
                "image", "inspect", "--format", "{{.Id}}|{{.Config.User}}", ref, check=False
            )
            if proc.returncode != 0:
                if pull_policy == "Never":
                    raise PodConfigError(
                        "ErrImageNeverPull",
                        f'Container image "{ref}" is not present with pull policy of Never',
                    )
                raise PodConfigError(
                    "ErrImagePull",
                    f'image "{ref}" is not in local storage and no registry is reachable',
                )
            image_id, _, user = proc.stdout.strip().partition("|")
            self._images[ref] = (image_id, user)
        return self._images[ref]

    # the container ------------------------------------------------------------------------
    def prepare(
        self,
        pod: dict[str, Any],
        container: dict[str, Any],
        env: dict[str, str],
        pod_dir: Path,
        name: str,
        expand: Callable[[str], str],
    ) -> Prepared:
        spec = pod["spec"]
        ref = container.get("image") or ""
        policy = container.get("imagePullPolicy") or "IfNotPresent"
        image_id, image_user = self.image(ref, policy)
        args = [
            "create",
            "--name",
            name,
            "--label",
            f"{LABEL}={self.root_dir}",
            "--network",
            "host",
            "--hostname",
            pod["metadata"]["name"][:63],
            "--ulimit",
            f"nofile={self.ulimit_nofile}:{self.ulimit_nofile}",
            "--ulimit",
            f"nproc={self.ulimit_nproc}:{self.ulimit_nproc}",
            "--pull",
            "never",
            "--stop-timeout",
            str(int(spec.get("terminationGracePeriodSeconds", 30))),
        ]
        args += security_args(pod, container, image_user, self.root_dir / "seccomp")
        # Env: the service variables a kubelet sets, then the container's own; the values
        # travel in podman's environment (`--env NAME`), never on a command line.
        u = urlparse(self.api_server)
        host, port = u.hostname or "127.0.0.1", str(u.port or 443)
        full = {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            **env,
        }
        for k in full:
            args += ["--env", k]
        if container.get("workingDir"):
            args += ["--workdir", container["workingDir"]]
        # Volumes.
        psc = spec.get("securityContext") or {}
        vols = self._volumes(pod, pod_dir, psc.get("fsGroup"))
        for m in container.get("volumeMounts") or []:
            if m["name"] not in vols:
                raise PodConfigError(
                    "CreateContainerConfigError", f"volume {m['name']!r} not found in the pod"
                )
            kind, src = vols[m["name"]]
            ro = bool(m.get("readOnly")) or kind in (
                "secret",
                "configMap",
                "projected",
                "downwardAPI",
            )
            if kind == "tmpfs":
                args += ["--tmpfs", f"{m['mountPath']}:rw,mode=1777,{src}"]
                continue
            host_path = Path(src) / m["subPath"] if m.get("subPath") else Path(src)
            if m.get("subPath"):
                host_path.mkdir(parents=True, exist_ok=True)
            args += ["--volume", f"{host_path}:{m['mountPath']}:{'ro' if ro else 'rw'}"]
        # The termination message file.
        term = pod_dir / f"termination-{container['name']}"
        term.write_bytes(b"")
        term.chmod(0o666)
        term_path = container.get("terminationMessagePath") or "/dev/termination-log"
        args += ["--volume", f"{term}:{term_path}:rw"]
        # Command and args, Kubernetes' way: command replaces ENTRYPOINT (and drops CMD).
        command = [expand(a) for a in container.get("command") or []]
        cargs = [expand(a) for a in container.get("args") or []]
        if command:
            args += ["--entrypoint", json.dumps(command)]
        args += [ref, *cargs]
        return Prepared(
            args,
            full,
            term,
            container.get("terminationMessagePolicy") or "File",
            image_id,
        )

    # volumes ------------------------------------------------------------------------------
    def _volumes(
        self, pod: dict[str, Any], pod_dir: Path, fs_group: int | None
    ) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for v in pod["spec"].get("volumes") or []:
            name = v["name"]
            d = pod_dir / "volumes" / name
            if "emptyDir" in v:
                ed = v["emptyDir"] or {}
                if ed.get("medium") == "Memory":
                    size = ed.get("sizeLimit")
                    out[name] = ("tmpfs", f"size={size}" if size else "size=64m")
                    continue
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o777)
                if fs_group is not None:
                    os.chown(d, -1, int(fs_group))
                    d.chmod(0o2777)
                out[name] = ("emptyDir", str(d))
            elif "secret" in v or "configMap" in v or "downwardAPI" in v or "projected" in v:
                kind = next(
                    k for k in ("secret", "configMap", "downwardAPI", "projected") if k in v
                )
                self._write_files(pod, d, kind, v[kind])
                out[name] = (kind, str(d))
            else:
                other = sorted(k for k in v if k != "name")
                raise PodConfigError(
                    "CreateContainerConfigError",
                    f"volume {name!r}: the local kubelet cannot mount {', '.join(other)} volumes",
                )
        return out

    def _write_files(self, pod: dict[str, Any], d: Path, kind: str, src: dict[str, Any]) -> None:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        mode = int(src.get("defaultMode", 0o644))
        files: dict[str, tuple[bytes, int]] = {}
        sources = src.get("sources") or [] if kind == "projected" else [{kind: src}]
        for s in sources:
            files.update(self._source_files(pod, s, mode))
        for rel, (data, fmode) in files.items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(fmode)
        d.chmod(0o755)

    def _source_files(
        self, pod: dict[str, Any], s: dict[str, Any], mode: int
    ) -> dict[str, tuple[bytes, int]]:
        ns = pod["metadata"]["namespace"]
        if "serviceAccountToken" in s:
            t = s["serviceAccountToken"]
            return {t["path"]: (self._token(pod, t).encode(), mode)}
        if "secret" in s or "configMap" in s:
            kind = "secret" if "secret" in s else "configMap"
            ref = s[kind]
            name = ref.get("secretName") or ref.get("name")
            data = self._data(kind, ns, name, bool(ref.get("optional")))
            return self._items(data, ref, mode, f"{kind} {name!r}")
        if "downwardAPI" in s:
            out = {}
            for item in s["downwardAPI"].get("items") or []:
                fr = item.get("fieldRef")
                if not fr:
                    raise PodConfigError(
                        "CreateContainerConfigError", "downwardAPI: only fieldRef items"
                    )
                value = _field(pod, fr["fieldPath"])
                out[item["path"]] = (value.encode(), int(item.get("mode", mode)))
            return out
        raise PodConfigError(
            "CreateContainerConfigError", f"projected source {sorted(s)} is not supported"
        )

    def _items(
        self, data: dict[str, bytes] | None, ref: dict[str, Any], mode: int, what: str
    ) -> dict[str, tuple[bytes, int]]:
        if data is None:
            return {}
        items = ref.get("items")
        if not items:
            return {k: (v, mode) for k, v in data.items()}
        out = {}
        for item in items:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise PodConfigError(
                    "CreateContainerConfigError", f"{what} has no key {item['key']!r}", retry=True
                )
            out[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
        return out

    def _data(self, kind: str, ns: str, name: str, optional: bool) -> dict[str, bytes] | None:
        from kubernetes.client import ApiException

        try:
            if kind == "secret":
                obj = self.core.read_namespaced_secret(name, ns)
                return {k: base64.b64decode(v) for k, v in (obj.data or {}).items()}
            obj = self.core.read_namespaced_config_map(name, ns)
            out = {k: v.encode() for k, v in (obj.data or {}).items()}
            out.update({k: base64.b64decode(v) for k, v in (obj.binary_data or {}).items()})
            return out
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            if exc.status == 404:
                raise PodConfigError(
                    "CreateContainerConfigError", f'{kind.lower()} "{name}" not found', retry=True
                ) from None
            raise

    def _token(self, pod: dict[str, Any], t: dict[str, Any]) -> str:
        """A TokenRequest for the pod's ServiceAccount, bound to the pod."""
        meta, spec = pod["metadata"], pod["spec"]
        sa = spec.get("serviceAccountName") or "default"
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": int(t.get("expirationSeconds", 3607)),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        if t.get("audience"):
            body["spec"]["audiences"] = [t["audience"]]
        resp = self.core.create_namespaced_service_account_token(sa, meta["namespace"], body)
        return str(resp.status.token)


def _field(pod: dict[str, Any], path: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
    }
    if path not in simple:
        raise PodConfigError("CreateContainerConfigError", f"unsupported fieldRef {path}")
    return str(simple[path] or "")


def container_name(pod: dict[str, Any], container: dict[str, Any]) -> str:
    m = pod["metadata"]
    raw = f"k8s_{container['name']}_{m['name']}_{m['namespace']}_{m['uid'][:8]}"
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", raw)
