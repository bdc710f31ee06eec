package compiler

import "github.com/cilium/ebpf/asm"

// The register and stack contract between the passes (parse guard,
// classifier, statements and actions). Generators take it as given and
// say in their comments which scratch registers they clobber.

// regs names what the callee-saved registers hold from the parse guard
// on. Helpers clobber R0–R5; R6–R9 survive them.
type regs struct{}

const (
	regSkb     = asm.R6 // the __sk_buff context, always
	regData    = asm.R7 // skb->data, valid while compiler.fresh (reloaded after helpers that move the packet)
	regDataEnd = asm.R8 // skb->data_end, likewise
	regL4      = asm.R9 // transport header offset from skb->data (actions reload it from slotL4Off); table lookups use it as regPerfect
)

// Stack slots (offsets from R10). Every slot is listed in stackFrame, which
// a test checks for overlaps and for slots declared but not listed.
const (
	slotFam   = -8  // 4 or 6
	slotInfo  = -16 // info* bits
	slotProto = -24 // transport protocol (after IPv6 extension headers)
	slotL4Off = -32 // offset of the transport header from skb->data
	slotSport = -40 // host order, absentPort when the header is absent
	slotDport = -48
	slotFlags = -56 // TCP flags byte, absentFlags when absent
	slotNHOff = -64 // offset of the byte that names the transport protocol
	slotSaddr = -88 // LPM key: prefix length (u32), then the address
	slotDaddr = -112
	slotKey   = -120 // u32 map key
	slotT1    = -128 // action temporaries
	slotT2    = -136
	slotT3    = -144
	slotT4    = -152
	slotRule  = -160 // counter slot of the rule whose body runs (table segments)
	slotOpt   = -168 // length of IPv4 options / IPv6 extension headers being moved
	slotDiff  = -176 // checksum difference across a kfunc call
	slotBuf   = -304 // MaxOptMove bytes: options being moved; before the bodies, the record scan's struct (linscan.go)
	slotHdr   = -328 // 20 bytes (24 reserved): a funnel header being built
	slotTKey  = -384 // 56 bytes: a rule table key being built
	slotBest  = -392 // lowest priority found so far in a table segment
	slotBody  = -400 // its body
	slotGen   = -408 // the live table generation (0/1)

	slotTrace = -416 // u64 trace id of the packet, 0 = not traced (trace.go)
	slotParam = -424 // the running body's entry in the parameter map (params.go)
)

// frame is the stack layout: each slot's name, offset and size.
type frame []frameSlot

type frameSlot struct {
	name string
	off  int16 // from R10, negative
	size int16
}

// stackFrame is the program's frame.
var stackFrame = frame{
	{"slotFam", slotFam, 8}, {"slotInfo", slotInfo, 8}, {"slotProto", slotProto, 8},
	{"slotL4Off", slotL4Off, 8}, {"slotSport", slotSport, 8}, {"slotDport", slotDport, 8},
	{"slotFlags", slotFlags, 8}, {"slotNHOff", slotNHOff, 8},
	{"slotSaddr", slotSaddr, 20}, {"slotDaddr", slotDaddr, 20},
	{"slotKey", slotKey, 8}, {"slotT1", slotT1, 8}, {"slotT2", slotT2, 8}, {"slotT3", slotT3, 8}, {"slotT4", slotT4, 8},
	{"slotRule", slotRule, 8}, {"slotOpt", slotOpt, 8}, {"slotDiff", slotDiff, 8},
	{"slotBuf", slotBuf, MaxOptMove}, {"slotHdr", slotHdr, 24},
	{"slotTKey", slotTKey, 56}, {"slotBest", slotBest, 8}, {"slotBody", slotBody, 8}, {"slotGen", slotGen, 8},
	{"slotTrace", slotTrace, 8},
	{"slotParam", slotParam, 8},
}

// overlaps returns the pairs of slots that share bytes, and slots outside
// the 512-byte stack.
func (f frame) overlaps() []string {
	var out []string
	for i, a := range f {
		if a.off+a.size > 0 || a.off < -512 {
			out = append(out, a.name+" outside the stack")
		}
		for _, b := range f[i+1:] {
			if a.off < b.off+b.size && b.off < a.off+a.size {
				out = append(out, a.name+" overlaps "+b.name)
			}
		}
	}
	return out
}
