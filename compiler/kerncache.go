package compiler

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
)

// Reading kernel BTF (about 5 MB parsed by btf.LoadKernelSpec) for the
// few skb offsets of kernelSkb is a fixed cost of every command that
// compiles, about a quarter of a rule change on a small hook. The offsets
// and the kfunc's BTF id can't change while the kernel runs, so they are
// kept in a file on /run (tmpfs: gone at reboot) under the boot's id; a
// file of another boot, or one that doesn't parse, is ignored and
// rewritten.

// KernelCacheFile is where the offsets are kept; empty disables the cache.
var KernelCacheFile = "/run/sfunnel/kernel-skb"

const kernCacheVersion = "sfunnel-kernel-skb v1"

func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return string(bytes.TrimSpace(b))
}

func (k kernelSkb) cacheText(boot string) string {
	return fmt.Sprintf("%s %s %t %d %d %d %t %d %d %d\n", kernCacheVersion, boot,
		k.ok, k.kfunc, k.byteOff, k.shift, k.mtu, k.devOff, k.mtuOff, k.hhOff)
}

// readKernelCache returns the cached offsets of this boot, if any.
func readKernelCache(path, boot string) (kernelSkb, bool) {
	var k kernelSkb
	if path == "" || boot == "" {
		return k, false
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return k, false
	}
	var v1, v2, got string
	n, err := fmt.Sscanf(string(b), "%s %s %s %t %d %d %d %t %d %d %d\n", &v1, &v2, &got,
		&k.ok, &k.kfunc, &k.byteOff, &k.shift, &k.mtu, &k.devOff, &k.mtuOff, &k.hhOff)
	if err != nil || n != 11 || v1+" "+v2 != kernCacheVersion || got != boot || k.cacheText(boot) != string(b) {
		return kernelSkb{}, false
	}
	return k, true
}

// writeKernelCache stores k for this boot (temp file and rename, so a
// reader sees the old file or the new one); errors only lose the cache.
func writeKernelCache(path, boot string, k kernelSkb) {
	if path == "" || boot == "" {
		return
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".kernel-skb-*")
	if err != nil {
		return
	}
	_, werr := f.WriteString(k.cacheText(boot))
	if cerr := f.Close(); werr != nil || cerr != nil || os.Rename(f.Name(), path) != nil {
		os.Remove(f.Name())
	}
}
