// Command sfunnel rewrites layer-4 headers in the kernel with eBPF, driven
// by an nftables-style rule language. See sfunnel(8) and sfunnel.conf(5).
package main

import (
	"os"
	"runtime"
)

func init() {
	// --netns switches the namespace of the calling thread; keep main on one
	// thread so netlink and BPF calls all happen inside it.
	runtime.LockOSThread()
}

func main() {
	os.Exit(Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}
