"""Kubernetes Pod Security Standards, level "restricted" (baseline included), as a pure check
of one pod spec: what the PodSecurity admission controller would reject in a namespace that
enforces `pod-security.kubernetes.io/enforce: restricted`. One function per control of the
published standard (kubernetes.io/docs/concepts/security/pod-security-standards), so a
failing control names itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def _containers(pod: dict) -> Iterator[dict]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def _contexts(pod: dict) -> Iterator[tuple[str, dict]]:
    """(where, securityContext) for the pod and every container."""
    yield "pod", pod.get("securityContext") or {}
    for c in _containers(pod):
        yield f"container {c['name']}", c.get("securityContext") or {}


# -- baseline ----------------------------------------------------------------------------------
def host_process(pod: dict) -> list[str]:
    return [
        f"{where}: windowsOptions.hostProcess"
        for where, sc in _contexts(pod)
        if (sc.get("windowsOptions") or {}).get("hostProcess")
    ]


def host_namespaces(pod: dict) -> list[str]:
    return [f"pod: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]


def privileged(pod: dict) -> list[str]:
    return [f"{w}: privileged" for w, sc in _contexts(pod) if w != "pod" and sc.get("privileged")]


def host_path_volumes(pod: dict) -> list[str]:
    return [f"volume {v['name']}: hostPath" for v in pod.get("volumes") or [] if "hostPath" in v]


def host_ports(pod: dict) -> list[str]:
    return [
        f"container {c['name']}: hostPort {p['hostPort']}"
        for c in _containers(pod)
        for p in c.get("ports") or []
        if p.get("hostPort")
    ]


def app_armor(pod: dict) -> list[str]:
    return [
        f"{where}: appArmorProfile {sc['appArmorProfile']['type']}"
        for where, sc in _contexts(pod)
        if (sc.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in SECCOMP_OK
    ]


def se_linux(pod: dict) -> list[str]:
    problems = []
    for where, sc in _contexts(pod):
        opts = sc.get("seLinuxOptions") or {}
        if opts.get("type", "") not in SELINUX_TYPES:
            problems.append(f"{where}: seLinuxOptions.type {opts['type']}")
        problems += [f"{where}: seLinuxOptions.{k}" for k in ("user", "role") if opts.get(k)]
    return problems


def proc_mount(pod: dict) -> list[str]:
    return [
        f"{where}: procMount {sc['procMount']}"
        for where, sc in _contexts(pod)
        if sc.get("procMount", "Default") != "Default"
    ]


def seccomp_not_unconfined(pod: dict) -> list[str]:
    return [
        f"{where}: seccompProfile Unconfined"
        for where, sc in _contexts(pod)
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined"
    ]


def sysctls(pod: dict) -> list[str]:
    given = (pod.get("securityContext") or {}).get("sysctls") or []
    return [f"pod: sysctl {s['name']}" for s in given if s["name"] not in SAFE_SYSCTLS]


def baseline_capabilities(pod: dict) -> list[str]:
    return [
        f"container {c['name']}: adds {cap}"
        for c in _containers(pod)
        for cap in ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
        if cap not in BASELINE_CAPABILITIES
    ]


# -- restricted --------------------------------------------------------------------------------
def volume_types(pod: dict) -> list[str]:
    problems = []
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {v['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    return problems


def privilege_escalation(pod: dict) -> list[str]:
    return [
        f"container {c['name']}: allowPrivilegeEscalation is not false"
        for c in _containers(pod)
        if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False
    ]


def run_as_non_root(pod: dict) -> list[str]:
    pod_level = (pod.get("securityContext") or {}).get("runAsNonRoot")
    problems = []
    for c in _containers(pod):
        own = (c.get("securityContext") or {}).get("runAsNonRoot")
        if own is False or (own is None and pod_level is not True):
            problems.append(f"container {c['name']}: runAsNonRoot is not true")
    if pod_level is False:
        problems.append("pod: runAsNonRoot false")
    return problems


def run_as_user(pod: dict) -> list[str]:
    return [f"{where}: runAsUser 0" for where, sc in _contexts(pod) if sc.get("runAsUser") == 0]


def seccomp_restricted(pod: dict) -> list[str]:
    pod_type = ((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    problems = []
    for c in _containers(pod):
        own = ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        effective = own or pod_type
        if effective not in SECCOMP_OK:
            problems.append(f"container {c['name']}: seccompProfile {effective or 'unset'}")
    return problems


def restricted_capabilities(pod: dict) -> list[str]:
    problems = []
    for c in _containers(pod):
        caps = (c.get("securityContext") or {}).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"container {c['name']}: does not drop ALL capabilities")
        problems += [
            f"container {c['name']}: adds {cap}"
            for cap in caps.get("add") or []
            if cap != "NET_BIND_SERVICE"
        ]
    return problems


RESTRICTED: list[Callable[[dict], list[str]]] = [
    host_process, host_namespaces, privileged, host_path_volumes, host_ports, app_armor,
    se_linux, proc_mount, seccomp_not_unconfined, sysctls, baseline_capabilities,
    volume_types, privilege_escalation, run_as_non_root, run_as_user, seccomp_restricted,
    restricted_capabilities,
]  # fmt: skip


def restricted_violations(pod: dict) -> list[str]:
    """Every reason the restricted profile rejects this pod spec (empty: admitted)."""
    return [f"{check.__name__}: {p}" for check in RESTRICTED for p in check(pod)]
