package compiler

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// Tracing (`meta nftrace set 1`, read by `sfunnel monitor trace`): a traced
// rule that matches gives the packet a trace id in slotTrace; from then on
// every rule that matches, and the exit that ends the program, write an
// abi.TraceRecord into the abi.TraceMap ring buffer. Programs without a
// traced rule get none of this code (c.tracing false).

// Its stack slot, slotTrace, is in frame.go; trace_record (the record
// writer, a global function) has a frame of its own.

// skb->ifindex in struct __sk_buff.
const skbIfindex = 40

// traceInit decides whether the program traces and, if so, clears the
// trace id first thing.
func (c *compiler) traceInit(rules []*grammar.Rule) {
	c.tracing = false
	for _, r := range rules {
		c.tracing = c.tracing || r.Trace
	}
	if !c.tracing {
		return
	}
	c.e.comment("no trace id yet")
	c.e.emit(sti(asm.R10, slotTrace, 0, asm.DWord))
}

// traceMaps adds the ring buffer of a traced program.
func (c *compiler) traceMaps() {
	if c.tracing {
		c.spec.Maps[abi.TraceMap] = &ebpf.MapSpec{Name: abi.TraceMap, Type: ebpf.RingBuf, MaxEntries: abi.TraceMapSize}
	}
}

// traceRule is where rule i matched (the start of its body): a traced
// rule starts tracing the packet, and a traced packet gets a record.
// R1-R5 are free here; R6-R9 are kept.
func (c *compiler) traceRule(i int, r *grammar.Rule) {
	if !c.tracing {
		return
	}
	e := &c.e
	if r.Trace {
		have := e.newLabel("trace_id")
		e.comment("meta nftrace set 1: give the packet a trace id")
		e.emit(
			ldx(asm.R1, asm.R10, slotTrace, asm.DWord),
			asm.JNE.Imm(asm.R1, 0, have),
			asm.FnGetPrandomU32.Call(),
			asm.Or.Imm32(asm.R0, 1), // never 0
			stx(asm.R10, slotTrace, asm.R0, asm.DWord),
		)
		e.label(have)
	}
	skip := e.newLabel("untraced")
	e.comment("traced packet: record the rule")
	e.emit(ldx(asm.R1, asm.R10, slotTrace, asm.DWord), asm.JEq.Imm(asm.R1, 0, skip))
	c.traceRecord(abi.TraceRule, int(c.slot(i)), abi.TraceNext, false)
	e.label(skip)
}

// traceExit is where the program ends with verdict: a traced packet gets
// its last record and loses its id. With leftAlone, slotKey holds the
// Stat* that says why (the count_stat exit).
func (c *compiler) traceExit(verdict uint8, leftAlone bool) {
	if !c.tracing {
		return
	}
	e := &c.e
	skip := e.newLabel("untraced")
	e.comment("traced packet: record the verdict")
	e.emit(ldx(asm.R1, asm.R10, slotTrace, asm.DWord), asm.JEq.Imm(asm.R1, 0, skip))
	c.traceRecord(abi.TraceVerdict, -1, verdict, leftAlone)
	e.emit(sti(asm.R10, slotTrace, 0, asm.DWord))
	e.label(skip)
}

// traceRecord writes one record (traceFunc): kind, rule (-1: none; in a
// table body the one in slotRule), verdict, and with leftAlone the reason
// in slotKey. Clobbers R0-R5.
func (c *compiler) traceRecord(kind uint8, rule int, verdict uint8, leftAlone bool) {
	e := &c.e
	e.emit(
		mov(asm.R1, asm.R6),
		ldx(asm.R2, asm.R10, slotTrace, asm.DWord),
	)
	switch {
	case rule < 0:
		e.emit(movi(asm.R3, -1))
	case c.dynRule:
		e.emit(ldx(asm.R3, asm.R10, slotRule, asm.DWord))
	default:
		e.emit(movi(asm.R3, int32(rule)))
	}
	e.emit(movi(asm.R4, int32(kind)|int32(verdict)<<8))
	if leftAlone {
		e.emit(
			ldx(asm.R5, asm.R10, slotKey, asm.Word),
			asm.Add.Imm(asm.R5, 1),
			asm.And.Imm(asm.R5, 0xff),
			asm.LSh.Imm(asm.R5, 16),
			asm.Or.Reg(asm.R4, asm.R5),
		)
	}
	e.emit(asm.Call.Label(traceFunc))
	c.usesTraceFunc = true
}

// traceFunc writes a trace record: trace_record(skb, id, rule, kind |
// verdict<<8 | reason<<16). A global function, verified once, not in
// every body and exit of a traced program on every path reaching them.
const traceFunc = "trace_record"

// trace_record's stack (its own frame: see mss.go on the 512 bytes).
const (
	traceSlotID   = -8
	traceSlotRule = -16
	traceSlotKind = -24
	traceSlotRec  = -32
)

// traceFunction emits trace_record after the program: the header fields,
// then the packet from the IP header on (at most abi.TraceDataLen bytes).
// A full ring buffer drops the record.
func (c *compiler) traceFunction() {
	if !c.usesTraceFunc {
		return
	}
	e := &c.e
	e.owner = 0
	done, nocopy, capped := "trace_out", "trace_nocopy", "trace_capped"
	hook := int64(0)
	if c.opts.Hook == grammar.HookEgress {
		hook = 1
	}
	e.label(traceFunc)
	e.comment("trace record (trace.go): a global function, verified once")
	e.emit(
		mov(asm.R6, asm.R1),
		stx(asm.R10, traceSlotID, asm.R2, asm.DWord),
		stx(asm.R10, traceSlotRule, asm.R3, asm.DWord),
		stx(asm.R10, traceSlotKind, asm.R4, asm.DWord),
		asm.LoadMapPtr(asm.R1, 0).WithReference(abi.TraceMap),
		movi(asm.R2, abi.TraceRecordLen),
		movi(asm.R3, 0),
		asm.FnRingbufReserve.Call(),
		asm.JEq.Imm(asm.R0, 0, done),
		stx(asm.R10, traceSlotRec, asm.R0, asm.DWord),
		asm.FnKtimeGetNs.Call(),
		mov(asm.R1, asm.R0),
		ldx(asm.R0, asm.R10, traceSlotRec, asm.DWord),
		stx(asm.R0, abi.TraceOffTime, asm.R1, asm.DWord),
		ldx(asm.R1, asm.R10, traceSlotID, asm.DWord),
		stx(asm.R0, abi.TraceOffID, asm.R1, asm.Word),
		ldx(asm.R1, asm.R10, traceSlotKind, asm.DWord),
		stx(asm.R0, abi.TraceOffKind, asm.R1, asm.Byte),
		asm.RSh.Imm(asm.R1, 8),
		stx(asm.R0, abi.TraceOffVerdict, asm.R1, asm.Byte),
		asm.RSh.Imm(asm.R1, 8),
		stx(asm.R0, abi.TraceOffReason, asm.R1, asm.Byte),
		sti(asm.R0, abi.TraceOffHook, hook, asm.Byte),
		ldx(asm.R1, asm.R10, traceSlotRule, asm.DWord),
		stx(asm.R0, abi.TraceOffRule, asm.R1, asm.Word),
		ldx(asm.R1, asm.R6, skbIfindex, asm.Word),
		stx(asm.R0, abi.TraceOffIfindex, asm.R1, asm.Word),
		ldx(asm.R1, asm.R6, skbMark, asm.Word),
		stx(asm.R0, abi.TraceOffMark, asm.R1, asm.Word),
		sti(asm.R0, abi.TraceOffMark+4, 0, asm.Word),
		ldx(asm.R4, asm.R6, skbLen, asm.Word),
		stx(asm.R0, abi.TraceOffLen, asm.R4, asm.Word),
		// caplen = min(len - l3, TraceDataLen), nothing if <= 0
		asm.Sub.Imm(asm.R4, int32(c.l3)),
		sti(asm.R0, abi.TraceOffCaplen, 0, asm.Word),
		asm.JSLE.Imm(asm.R4, 0, nocopy),
		asm.JLE.Imm(asm.R4, abi.TraceDataLen, capped),
		movi(asm.R4, abi.TraceDataLen),
	)
	e.label(capped)
	e.emit(
		stx(asm.R0, abi.TraceOffCaplen, asm.R4, asm.Word),
		mov(asm.R1, asm.R6),
		movi(asm.R2, int32(c.l3)),
		mov(asm.R3, asm.R0),
		asm.Add.Imm(asm.R3, abi.TraceHeaderLen),
		asm.FnSkbLoadBytes.Call(),
		asm.JSGE.Imm(asm.R0, 0, nocopy),
		ldx(asm.R1, asm.R10, traceSlotRec, asm.DWord),
		sti(asm.R1, abi.TraceOffCaplen, 0, asm.Word), // the copy failed
	)
	e.label(nocopy)
	e.emit(
		ldx(asm.R1, asm.R10, traceSlotRec, asm.DWord),
		movi(asm.R2, 0),
		asm.FnRingbufSubmit.Call(),
	)
	e.label(done)
	e.emit(movi(asm.R0, 0), asm.Return())
}

// traceSegment is the verdict of the segmentation redirect (segment.go).
const traceSegment = abi.TraceSegment
