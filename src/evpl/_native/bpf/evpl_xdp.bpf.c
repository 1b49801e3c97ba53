// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* evpl's XDP program for the xdp_udp backend (docs/xdp.md).
 *
 * Redirects to the AF_XDP socket of the receiving queue only the UDP
 * datagrams (over IPv4 or IPv6) whose (destination address, destination
 * port) an evpl Bind bound (map evpl_ports; an all-zero address stands for
 * any address of that family); everything else goes on to the kernel with
 * XDP_PASS, so the interface keeps working for the host: ARP, ICMP, ICMPv6
 * (neighbour discovery), TCP, other ports, IPv4 fragments, and IPv6 packets
 * whose first next header is not UDP (extension headers, fragments: the
 * kernel parses those; the Bind's port-reserving socket then drops what
 * was for evpl, counted in the socket's drops). Headers are only
 * bounds-checked here: userspace checks lengths and checksums, and counts
 * what it drops.
 *
 * Built by setup.py with `clang -O2 -target bpf` and embedded in the
 * evpl._native.xdp module.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct evpl_port_key {
	__u32 addr[4];  /* network byte order; IPv4: addr[0] only; all zero: any address */
	__u16 port;     /* network byte order */
	__u8 family;    /* 4 or 6 */
	__u8 pad;
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

static __always_inline int evpl_bound(struct evpl_port_key *key)
{
	if (bpf_map_lookup_elem(&evpl_ports, key))
		return 1;
	key->addr[0] = key->addr[1] = key->addr[2] = key->addr[3] = 0;
	return bpf_map_lookup_elem(&evpl_ports, key) != 0;
}

SEC("xdp")
int evpl_xdp_udp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct evpl_port_key key = {};

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		struct udphdr *udp;
		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
			return XDP_PASS;
		if (ip->frag_off & bpf_htons(0x3fff))   /* MF or an offset: the kernel reassembles */
			return XDP_PASS;
		udp = (void *)ip + ip->ihl * 4;
		if ((void *)(udp + 1) > end)
			return XDP_PASS;
		key.addr[0] = ip->daddr;
		key.port = udp->dest;   /* read in each branch: the verifier tracks its bound here */
		key.family = 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct udphdr *udp;
		/* UDP right after the fixed header only: neighbour discovery
		 * (ICMPv6) and anything with extension headers go to the kernel */
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_UDP)
			return XDP_PASS;
		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > end)
			return XDP_PASS;
		__builtin_memcpy(key.addr, &ip6->daddr, 16);
		key.port = udp->dest;
		key.family = 6;
	} else {
		return XDP_PASS;
	}
	if (!evpl_bound(&key))
		return XDP_PASS;
	return bpf_redirect_map(&evpl_xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
