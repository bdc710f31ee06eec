package compiler

import (
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
