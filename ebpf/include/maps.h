/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/* Map definitions (BTF-defined, as aya and libbpf expect). Layouts: shoal_abi.h. */
#ifndef SHOAL_MAPS_H
#define SHOAL_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "shoal_abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct shoal_config);
} shoal_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SHOAL_MAX_PORTS);
	__type(key, __u32);
	__type(value, struct shoal_port);
} shoal_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SHOAL_MAX_ENDPOINTS);
	__type(key, struct shoal_ep_key);
	__type(value, struct shoal_endpoint);
} shoal_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SHOAL_MAX_RIFS);
	__type(key, struct shoal_rif_key);
	__type(value, struct shoal_rif);
} shoal_rifs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SHOAL_MAX_ROUTES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct shoal_route_key);
	__type(value, struct shoal_route);
} shoal_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SHOAL_MAX_SG_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct shoal_sg_key);
	__type(value, __u32);
} shoal_sg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SHOAL_MAX_CT);
	__type(key, struct shoal_ct_key);
	__type(value, struct shoal_ct_val);
} shoal_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SHOAL_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} shoal_counters SEC(".maps");

static __always_inline void shoal_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&shoal_counters, &idx);

	if (v)
		*v += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline struct shoal_config *shoal_get_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&shoal_config, &zero);
}

#endif /* SHOAL_MAPS_H */
