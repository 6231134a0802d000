// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/*
 * Auxiliary XDP program with no maps: shoal_xdp_drop, the XDP_DROP ceiling of the
 * pps benchmark.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int shoal_xdp_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}

char _license[] SEC("license") = "Dual BSD/GPL";
