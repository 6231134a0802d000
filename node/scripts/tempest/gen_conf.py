#!/usr/bin/env python3
"""Writes a tempest.conf for a running Shoal cluster.

Reads the cluster's admin-openrc, logs in through the Identity API, makes sure the two
flavors and the image Tempest needs exist (creating them through the Compute and Image
APIs, as a user would), and writes tempest.conf with the feature flags that say what
Shoal does not do. Idempotent: a second run reuses the flavors and the image.

Only the standard library: it runs with any python3, the Tempest venv's included.

    gen_conf.py --openrc DIR/node1/admin-openrc --out WORKSPACE/etc/tempest.conf
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

# What Shoal's Image API accepts (node/src/api/image_record.rs DISK_FORMATS and
# CONTAINER_FORMATS, Glance's defaults). Tempest picks the first of each for the images it
# creates and chooses invalid formats outside these lists.
DISK_FORMATS = ["raw", "qcow2", "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "vdi", "iso", "ploop"]
CONTAINER_FORMATS = ["bare", "ovf", "ova", "aki", "ari", "ami", "docker", "compressed"]

# The Compute microversions Shoal serves (node/src/api/nova/version.rs MIN and MAX,
# docs/api-coverage.md): Tempest runs the classes whose range meets them and skips the rest.
COMPUTE_MIN_MICROVERSION = "2.1"
COMPUTE_MAX_MICROVERSION = "2.36"

# (name, ram MiB, vcpus, disk GiB): small enough to fit any test host once servers land.
FLAVORS = [("tempest.small", 128, 1, 1), ("tempest.alt", 192, 1, 1)]
IMAGE_NAME = "tempest-raw-1m"
# Nova's names for the filters scheduler/src/filters.rs implements.
SCHEDULER_FILTERS = [
    "ComputeFilter",
    "AvailabilityZoneFilter",
    "AggregateRamFilter",
    "AggregateDiskFilter",
    "AggregateCoreFilter",
    "AggregateInstanceExtraSpecsFilter",
    "ImagePropertiesFilter",
    "JsonFilter",
    "ServerGroupAntiAffinityFilter",
    "ServerGroupAffinityFilter",
    "SameHostFilter",
    "DifferentHostFilter",
]
IMAGE_BYTES = b"\0" * (1 << 20)


def read_openrc(path):
    env = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("export ") or "=" not in line:
                continue
            name, value = line[len("export "):].split("=", 1)
            env[name] = value.strip().strip("'\"")
    for need in ("OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME"):
        if need not in env:
            sys.exit(f"gen_conf: {path} has no {need}")
    return env


class Api:
    def __init__(self, rc):
        self.rc = rc
        self.ctx = None
        if rc.get("OS_CACERT"):
            import ssl

            self.ctx = ssl.create_default_context(cafile=rc["OS_CACERT"])
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": rc["OS_USERNAME"],
                            "password": rc["OS_PASSWORD"],
                            "domain": {"name": rc.get("OS_USER_DOMAIN_NAME", "Default")},
                        }
                    },
                },
                "scope": {
                    "project": {
                        "name": rc["OS_PROJECT_NAME"],
                        "domain": {"name": rc.get("OS_PROJECT_DOMAIN_NAME", "Default")},
                    }
                },
            }
        }
        url = rc["OS_AUTH_URL"].rstrip("/") + "/auth/tokens"
        resp, data = self.call("POST", url, body, token=None)
        self.token = resp.headers["X-Subject-Token"]
        self.catalog = data["token"]["catalog"]

    def endpoint(self, service_type):
        region = self.rc.get("OS_REGION_NAME")
        for svc in self.catalog:
            if svc["type"] != service_type:
                continue
            for ep in svc["endpoints"]:
                if ep["interface"] == "public" and (not region or ep.get("region") == region):
                    return ep["url"].rstrip("/")
        sys.exit(f"gen_conf: the catalog has no public {service_type} endpoint")

    def call(self, method, url, body=None, token="", raw=None, ctype=None):
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if raw is not None:
            data = raw
            headers["Content-Type"] = ctype or "application/octet-stream"
        if token is not None:
            headers["X-Auth-Token"] = token or self.token
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=60) as resp:
                text = resp.read()
                return resp, (json.loads(text) if text else None)
        except urllib.error.HTTPError as e:
            sys.exit(f"gen_conf: {method} {url} answered {e.code}: {e.read()[:500]!r}")


def ensure_flavors(api):
    compute = api.endpoint("compute")
    _, have = api.call("GET", compute + "/flavors/detail?is_public=None")
    by_name = {f["name"]: f["id"] for f in have["flavors"]}
    ids = []
    for name, ram, vcpus, disk in FLAVORS:
        if name not in by_name:
            _, made = api.call(
                "POST",
                compute + "/flavors",
                {"flavor": {"name": name, "ram": ram, "vcpus": vcpus, "disk": disk}},
            )
            by_name[name] = made["flavor"]["id"]
        ids.append(by_name[name])
    return ids


def ensure_image(api, name=IMAGE_NAME):
    image = api.endpoint("image")
    _, have = api.call("GET", image + f"/v2/images?name={name}")
    for img in have["images"]:
        if img["status"] == "active":
            return img["id"]
    _, made = api.call(
        "POST",
        image + "/v2/images",
        {
            "name": name,
            "disk_format": "raw",
            "container_format": "bare",
            "visibility": "public",
        },
    )
    api.call("PUT", image + f"/v2/images/{made['id']}/file", raw=IMAGE_BYTES)
    _, shown = api.call("GET", image + f"/v2/images/{made['id']}")
    if shown["status"] != "active":
        sys.exit(f"gen_conf: image {made['id']} is {shown['status']} after upload")
    return made["id"]


def ensure_role(api, name):
    """The role `name` exists, as devstack creates `service` (Tempest's service users, e.g. for
    `os-server-external-events`, get it)."""
    identity = api.rc["OS_AUTH_URL"].rstrip("/")
    _, have = api.call("GET", identity + f"/roles?name={name}")
    if not any(r["name"] == name for r in have["roles"]):
        api.call("POST", identity + "/roles", {"role": {"name": name}})


# The external network Tempest's router and floating IP tests take their gateways and floating
# addresses from (devstack's `public`).
PUBLIC_NETWORK = "public"
PUBLIC_CIDR = "172.24.4.0/24"


def ensure_public_network(api):
    net_url = api.endpoint("network") + "/v2.0"
    _, have = api.call("GET", net_url + f"/networks?name={PUBLIC_NETWORK}")
    for n in have["networks"]:
        if n.get("router:external") and n["subnets"]:
            return n["id"]
    _, made = api.call(
        "POST",
        net_url + "/networks",
        {"network": {"name": PUBLIC_NETWORK, "router:external": True}},
    )
    net_id = made["network"]["id"]
    api.call(
        "POST",
        net_url + "/subnets",
        {
            "subnet": {
                "network_id": net_id,
                "name": PUBLIC_NETWORK + "-subnet",
                "cidr": PUBLIC_CIDR,
                "ip_version": 4,
                "enable_dhcp": False,
            }
        },
    )
    return net_id


def network_extensions(api):
    """The aliases of the Neutron extensions the cluster lists."""
    url = api.endpoint("network") + "/v2.0/extensions"
    _, body = api.call("GET", url)
    return sorted(e["alias"] for e in body["extensions"])


def conf_text(rc, flavors, images, lock_path, log_file, network_exts, public_net):
    region = rc.get("OS_REGION_NAME", "RegionOne")
    b = lambda v: "true" if v else "false"  # noqa: E731
    sections = {
        "DEFAULT": {"log_file": log_file, "use_stderr": "false", "debug": "true"},
        "oslo_concurrency": {"lock_path": lock_path},
        "auth": {
            "use_dynamic_credentials": "true",
            "admin_username": rc["OS_USERNAME"],
            "admin_password": rc["OS_PASSWORD"],
            "admin_project_name": rc["OS_PROJECT_NAME"],
            "admin_domain_name": rc.get("OS_USER_DOMAIN_NAME", "Default"),
            # Tempest's default, as an outside conformance run uses it: each test project gets
            # a network, a subnet (a /28 of [network] project_network_cidr, 10.100.0.0/16)
            # and a router with its gateway on `public` and an interface on the subnet; the
            # compute tests boot their servers with a port on that network.
            "create_isolated_networks": "true",
        },
        "identity": {
            "uri_v3": rc["OS_AUTH_URL"],
            "auth_version": "v3",
            "region": region,
            "v3_endpoint_type": "public",
        },
        "identity-feature-enabled": {
            "api_v2": b(False),
            "api_v2_admin": b(False),
            "api_v3": b(True),
            # Shoal has no trusts, access rules (application credentials), password
            # security-compliance rules, or per-domain drivers.
            "trust": b(False),
            "access_rules": b(False),
            "security_compliance": b(False),
            "domain_specific_drivers": b(False),
            "immutable_user_source": b(False),
        },
        "compute": {
            "region": region,
            "flavor_ref": flavors[0],
            "flavor_ref_alt": flavors[1],
            # Two distinct images, so that the listing filters by image have something to tell
            # apart.
            "image_ref": images[0],
            "image_ref_alt": images[1],
            "min_microversion": COMPUTE_MIN_MICROVERSION,
            "max_microversion": COMPUTE_MAX_MICROVERSION,
            # `shoal dev --nodes 3`: every node is a compute host.
            "min_compute_nodes": "3",
        },
        # What Shoal's servers do not do yet is off. Server creates answer with an adminPass,
        # as Nova's enable_instance_password default.
        "compute-feature-enabled": {
            "enable_instance_password": b(True),
            # The filters shoal-scheduler implements (docs/scheduler.md); Tempest skips the
            # tests of the others.
            "scheduler_enabled_filters": ",".join(SCHEDULER_FILTERS),
            "snapshot": b(True),
            "shelve": b(True),
            # Resize and cold migration move the disk between nodes; rescue boots the rescue
            # image with the server's disk second (docs/compute.md).
            "resize": b(True),
            "cold_migration": b(True),
            "rescue": b(True),
        } | {
            k: b(False)
            for k in (
                "disk_config change_password console_output "
                "live_migration metadata_service "
                "interface_attach personality "
                "attach_encrypted_volume config_drive swap_volume volume_multiattach "
                "ide_bus vnc_console spice_console serial_console unified_limits"
            ).split()
        },
        "image": {
            "region": region,
            "disk_formats": ",".join(DISK_FORMATS),
            "container_formats": ",".join(CONTAINER_FORMATS),
            "hashing_algorithm": "sha512",
        },
        "image-feature-enabled": {
            "api_v2": b(True),
            # No interoperable import, locations, conversion or http store.
            "import_image": b(False),
            "manage_locations": b(False),
            "image_conversion": b(False),
            "http_store_enabled": b(False),
            "store_weight_enabled": b(False),
            "os_glance_reserved": b(True),
            "do_secure_hash": b(True),
        },
        "service_available": {
            "nova": b(True),
            "glance": b(True),
            # Not served by Shoal yet: volumes, object storage, dashboard, orchestration and
            # the rest.
            "neutron": b(True),
            "cinder": b(False),
            "swift": b(False),
            "horizon": b(False),
        },
        "network": {
            "region": region,
            "public_network_id": public_net,
            "floating_network_name": PUBLIC_NETWORK,
        },
        "network-feature-enabled": {
            # The Neutron extensions Shoal serves (GET /network/v2.0/extensions lists them):
            # Tempest skips the tests of every other extension.
            "api_extensions": ",".join(network_exts),
            # IPv6 subnets, their address modes and EUI-64 addresses are served by the API;
            # the datapath forwards IPv4 only (docs/network.md).
            "ipv6": b(True),
            "ipv6_subnet_attributes": b(True),
            "port_security": b(True),
        },
        # No servers to log in to.
        "validation": {"run_validation": b(False)},
    }
    if rc.get("OS_CACERT"):
        sections["identity"]["ca_certificates_file"] = rc["OS_CACERT"]
    out = []
    for name, opts in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {v}" for k, v in opts.items())
        out.append("")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--openrc", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rc = read_openrc(args.openrc)
    api = Api(rc)
    flavors = ensure_flavors(api)
    images = [ensure_image(api), ensure_image(api, IMAGE_NAME + "-alt")]
    public_net = ensure_public_network(api)
    ensure_role(api, "service")
    ws = os.path.dirname(os.path.dirname(os.path.abspath(args.out)))
    text = conf_text(
        rc,
        flavors,
        images,
        lock_path=os.path.join(ws, "lock"),
        log_file=os.path.join(ws, "tempest.log"),
        network_exts=network_extensions(api),
        public_net=public_net,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"gen_conf: wrote {args.out} (flavors {flavors[0]}, {flavors[1]}; images {images[0]}, {images[1]})")


if __name__ == "__main__":
    main()
