package grammar

// Lowering while the quick path reads.
//
// A file read by parseQuickFile and then lowered holds, at the peak, its
// tokens, the syntax structs of every rule and the growing AST at once:
// for 10 000 rules some 28 MB of syntax next to the 10 MB the AST keeps,
// and the collector sizes the heap from that peak for the rest of the
// command (the peak RSS of `sfunnel -f`). So Parse lowers each statement
// as soon as the quick path has read it, and each rule of a hook block as
// soon as it is read: a rule's syntax is garbage before the next rule is
// read. The lowering is the same code in the same order as lowering the
// finished tree (statements in file order, a block's rules hook by hook),
// so commands and errors are the same; blocks naming several interfaces,
// whose rules are lowered interface by interface, are lowered whole.
//
// When the quick path declines the file halfway, what was lowered is
// undone (checkpoint) and the file is parsed by participle as before.

// stmtSink takes what readQuickFile reads.
type stmtSink interface {
	// stmt takes a statement that has been read.
	stmt(st *stmtSyntax)
	// interfaceRules is called once the names of an interface block are
	// read; a non-nil result takes each rule of its hook blocks instead
	// of the block.
	interfaceRules(ib *interfaceSyntax) func(Hook, *ruleSyntax)
}

// fileSink lowers a file's statements as they are read.
type fileSink struct {
	l        *lowerer
	filename string
	incl     []Span
	depth    int
	streamed *interfaceSyntax // the interface block whose rules were lowered as read
}

func (s *fileSink) stmt(st *stmtSyntax) {
	if st.Interface != nil && st.Interface == s.streamed {
		return
	}
	s.l.stmt(st, s.filename, s.incl, s.depth)
}

func (s *fileSink) interfaceRules(ib *interfaceSyntax) func(Hook, *ruleSyntax) {
	if len(ib.Names) != 1 {
		return nil
	}
	s.streamed = ib
	name, nspan, ok := s.l.name(ib.Names[0])
	return func(hook Hook, r *ruleSyntax) {
		if ok {
			s.l.hookRule(name, nspan, hook, r, false)
		}
	}
}

// streamFile parses and lowers a file with the quick path, statement by
// statement. It returns false, with the lowerer as it was, when the quick
// path declines the file.
func (l *lowerer) streamFile(filename, src string, incl []Span, depth int) bool {
	undo := l.checkpoint()
	if readQuickFile(filename, src, &fileSink{l: l, filename: filename, incl: incl, depth: depth}) != nil {
		return true
	}
	undo()
	return false
}

// checkpoint returns a function that puts back what lowering statements
// changes: commands, errors, defines and declared sets.
func (l *lowerer) checkpoint() (undo func()) {
	ncmds, nerrs := len(l.cmds), len(l.errs)
	defines := make(map[string]*define, len(l.defines))
	for k, v := range l.defines {
		defines[k] = v
	}
	sets := make(map[string]SetType, len(l.sets))
	for k, v := range l.sets {
		sets[k] = v
	}
	return func() {
		clear(l.cmds[ncmds:])
		l.cmds, l.errs = l.cmds[:ncmds], l.errs[:nerrs]
		l.defines, l.sets = defines, sets
	}
}

// streamLowering turns lowering while reading on; the tests turn it off to
// compare.
var streamLowering = true
