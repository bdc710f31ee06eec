package compiler

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// With kernel BTF, the MTU check reads dev->mtu and hard_header_len
// (present in every kernel with bpf_cast_to_kern_ctx).
func TestKernelSkbMTU(t *testing.T) {
	k := loadKernelSkb()
	testenv.Require(t, k.ok, "no kernel BTF")
	if !k.mtu || k.devOff == 0 || k.mtuOff == 0 || k.hhOff == 0 {
		t.Fatalf("kernel skb layout %+v: dev/mtu/hard_header_len not found", k)
	}
}

// The cached offsets are those kernel BTF gives; a file of another boot,
// of another format or cut short is not used.
func TestKernelSkbCache(t *testing.T) {
	fresh := kernelSkbFromBTF()
	testenv.Require(t, fresh.ok, "no kernel BTF")
	path := filepath.Join(t.TempDir(), "sub", "kernel-skb")
	boot := bootID()
	if boot == "" {
		t.Fatal("no boot id in /proc/sys/kernel/random/boot_id")
	}
	if _, ok := readKernelCache(path, boot); ok {
		t.Fatal("a missing file was read as a cache")
	}
	writeKernelCache(path, boot, fresh)
	got, ok := readKernelCache(path, boot)
	if !ok || got != fresh {
		t.Fatalf("cache read back %+v, %v; BTF gives %+v", got, ok, fresh)
	}
	if _, ok := readKernelCache(path, "another-boot"); ok {
		t.Fatal("another boot's offsets were used")
	}
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{
		string(text[:len(text)/2]),
		strings.Replace(string(text), "v1", "v0", 1),
		strings.TrimSuffix(string(text), "\n") + " 7\n",
	} {
		if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
			t.Fatal(err)
		}
		if k, ok := readKernelCache(path, boot); ok {
			t.Fatalf("damaged cache %q read as %+v", bad, k)
		}
	}
}
