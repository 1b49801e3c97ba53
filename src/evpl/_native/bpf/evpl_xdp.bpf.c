// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* evpl's XDP program for the xdp_udp backend (docs/xdp.md).
 *
 * Redirects to the AF_XDP socket of the receiving queue only the IPv4 UDP
 * datagrams whose (destination address, destination port) an evpl Bind
 * bound (map evpl_ports; address 0 stands for any address); everything else
 * (ARP, ICMP, TCP, other ports, IP fragments, IPv6) goes on to the kernel
 * with XDP_PASS, so the interface keeps working for the host. Headers are
 * only bounds-checked here: userspace checks lengths and checksums, and
 * counts what it drops.
 *
 * Built by setup.py with `clang -O2 -target bpf` and embedded in the
 * evpl._native.xdp module.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct evpl_port_key {
	__u32 addr;     /* network byte order; 0: any address */
	__u16 port;     /* network byte order */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct evpl_port_key);
	__type(value, __u32);
} evpl_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} evpl_xsks SEC(".maps");

SEC("xdp")
int evpl_xdp_udp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;
	struct evpl_port_key key = {};

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
		return XDP_PASS;
	if (ip->frag_off & bpf_htons(0x3fff))     /* MF or an offset: the kernel reassembles */
		return XDP_PASS;
	udp = (void *)ip + ip->ihl * 4;
	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	key.addr = ip->daddr;
	key.port = udp->dest;
	if (!bpf_map_lookup_elem(&evpl_ports, &key)) {
		key.addr = 0;
		if (!bpf_map_lookup_elem(&evpl_ports, &key))
			return XDP_PASS;
	}
	return bpf_redirect_map(&evpl_xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
