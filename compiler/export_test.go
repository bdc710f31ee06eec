package compiler

// MaxCodeShapes is the code budget of a large hook (shapescan.go).
const MaxCodeShapes = maxCodeShapes

// ShapeRecordRules returns the rules of a compiled hook whose entries are
// in shape records (shapescan.go): tests check that packets reach them.
func ShapeRecordRules(p *Program) map[int]bool {
	out := map[int]bool{}
	for _, seg := range p.c.segs {
		for _, sh := range seg.scanShapes {
			for _, en := range sh.ents {
				out[en.rule] = true
			}
		}
	}
	return out
}

// ScanRecords returns the number of records of a compiled hook's record
// scan (a packet that matches none reads them all).
func ScanRecords(p *Program) int {
	if p.c.lin == nil {
		return 0
	}
	n := 0
	for _, lists := range p.c.lin.segs {
		for _, recs := range lists {
			n += len(recs) / recSize
		}
	}
	return n
}
