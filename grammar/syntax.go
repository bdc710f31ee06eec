package grammar

import (
	"sync"

	"github.com/alecthomas/participle/v2"
	"github.com/alecthomas/participle/v2/lexer"
)

// The parse tree. These structs mirror the text as written (lenient order,
// $vars, sfunnel's `encap`/`decap` words); lower.go turns them into the
// canonical AST of ast.go and reports semantic errors at their tokens.

var parser = &lazyParser{build: func() *participle.Parser[fileSyntax] {
	return buildParser(parseLexer, declineQuickRule, declineQuickLines)
}}

// buildParser builds the grammar with lexer def and the productions that
// read rules and hook blocks before the grammar does (quick.go).
func buildParser(def lexer.Definition, rule func(*lexer.PeekingLexer) (quickRule, error), lines func(*lexer.PeekingLexer) (quickLines, error)) *participle.Parser[fileSyntax] {
	return participle.MustBuild[fileSyntax](
		participle.Lexer(def),
		participle.Elide("Comment", "Continuation", "Whitespace"),
		participle.UseLookahead(3),
		participle.ParseTypeWith(rule),
		participle.ParseTypeWith(lines),
	)
}

// lazyParser is a participle parser built when first used: building one
// is some 3 ms of every command's start (a tenth of `delete rule`), and a
// file the quick path reads whole (quickfile.go) needs none.
type lazyParser struct {
	once  sync.Once
	build func() *participle.Parser[fileSyntax]
	p     *participle.Parser[fileSyntax]
}

func (l *lazyParser) get() *participle.Parser[fileSyntax] {
	l.once.Do(func() {
		if l.p == nil {
			l.p = l.build()
		}
	})
	return l.p
}

func (l *lazyParser) ParseString(filename, src string) (*fileSyntax, error) {
	return l.get().ParseString(filename, src)
}

func (l *lazyParser) ParseBytes(filename string, src []byte) (*fileSyntax, error) {
	return l.get().ParseBytes(filename, src)
}

type fileSyntax struct {
	Pos lexer.Position
	// A newline or `;` ends each statement, so `udp dport 5 drop counter`
	// is an error rather than two rules. The statement after separators is
	// optional (`@@?`) so that blank and comment lines at the end are
	// separators that lead nowhere: with `( EOL | ';' )+ @@`, four of them
	// took participle past its lookahead (3) before the statement failed,
	// and it reported an error. Hook blocks and lists have the same form.
	Stmts []*stmtSyntax `parser:"( EOL | ';' )* ( @@ ( ( EOL | ';' )+ @@? )* )?"`
}

type stmtSyntax struct {
	Pos lexer.Position
	// Quick is a rule read by the quick path (quick.go); settle moves it
	// to Rule. The same holds for the Quick fields below.
	Quick     quickRule        `parser:"  @@"`
	Define    *defineSyntax    `parser:"| @@"`
	Include   *includeSyntax   `parser:"| @@"`
	Set       *setSyntax       `parser:"| 'add'? @@"`
	Interface *interfaceSyntax `parser:"| @@"`
	Command   *commandSyntax   `parser:"| @@"`
	Rule      *ruleSyntax      `parser:"| @@"`
	Tokens    []lexer.Token
}

type defineSyntax struct {
	Pos    lexer.Position
	Name   string       `parser:"'define' @Ident '='"`
	Value  *valueSyntax `parser:"@@"`
	Tokens []lexer.Token
}

type includeSyntax struct {
	Pos    lexer.Position
	Path   string `parser:"'include' @String"`
	Tokens []lexer.Token
}

type setSyntax struct {
	Pos     lexer.Position
	Name    string `parser:"'set' @Ident '{' ( EOL | ';' )*"`
	Type    string `parser:"'type' @Ident ( EOL | ';' )*"`
	TypePos lexer.Position
	Props   []*setPropSyntax `parser:"( @@ ( EOL | ';' )* )* '}'"`
	Tokens  []lexer.Token
}

// setPropSyntax is one of a set's `flags`, `size` and `elements` lines,
// in any order as nft takes them.
type setPropSyntax struct {
	Pos      lexer.Position
	Flags    []string      `parser:"  'flags' @Ident ( ',' @Ident )*"`
	Size     *numberSyntax `parser:"| 'size' @@"`
	Elements *valueSyntax  `parser:"| 'elements' '=' @@"`
	Tokens   []lexer.Token
}

type interfaceSyntax struct {
	Pos    lexer.Position
	Names  []*nameSyntax `parser:"'interface' ( @@ | '{' EOL* @@ ( ',' EOL* @@ )* EOL* '}' ) '{'"`
	Hooks  []*hookSyntax `parser:"( EOL | ';' )* ( @@ ( EOL | ';' )* )* '}'"`
	Tokens []lexer.Token
}

type nameSyntax struct {
	Pos    lexer.Position
	Name   string `parser:"@(Ident | Var)"`
	Tokens []lexer.Token
}

type hookSyntax struct {
	Pos    lexer.Position
	Hook   string            `parser:"@('ingress' | 'egress') '{'"`
	Quick  quickLines        `parser:"( @@ '}'"`
	Rules  []*hookLineSyntax `parser:"| ( EOL | ';' )* ( @@ ( ( EOL | ';' )+ @@? )* )? '}' )"`
	Tokens []lexer.Token
}

// hookLineSyntax is one rule of a hook block. A line that is not a rule is
// kept as Bad, so the block still parses and the lowerer can parse that
// line on its own, for the same message as on the command line (participle
// would otherwise back out of the whole block and blame its brace).
type hookLineSyntax struct {
	Quick quickRule      `parser:"  @@"`
	Rule  *ruleSyntax    `parser:"| @@ (?= EOL | ';' | '}' )"`
	Bad   *badLineSyntax `parser:"| @@"`
}

type badLineSyntax struct {
	Pos    lexer.Position
	Words  []string `parser:"( @'{' @~'}'* @'}' | @~( EOL | ';' | '}' ) )+"`
	Tokens []lexer.Token
}

// commandSyntax is one command of SPEC §3.2.
type commandSyntax struct {
	Pos lexer.Position

	List    *listSyntax    `parser:"  'list' @@"`
	Flush   *flushSyntax   `parser:"| 'flush' @@"`
	Add     *addSyntax     `parser:"| 'add' @@"`
	Insert  *insertSyntax  `parser:"| 'insert' @@"`
	Replace *replaceSyntax `parser:"| 'replace' @@"`
	Delete  *deleteSyntax  `parser:"| 'delete' @@"`
	Reset   *resetSyntax   `parser:"| 'reset' @@"`
	Monitor bool           `parser:"| ( @'monitor'"`
	Trace   bool           `parser:"    @'trace'? )"`

	Tokens []lexer.Token
}

type listSyntax struct {
	Ruleset   bool          `parser:"  @'ruleset'"`
	Interface *targetSyntax `parser:"| 'interface' @@"`
	Sets      bool          `parser:"| @'sets'"`
	Set       *nameSyntax   `parser:"| 'set' @@"`
}

type flushSyntax struct {
	Ruleset   bool          `parser:"  @'ruleset'"`
	Interface *targetSyntax `parser:"| 'interface' @@"`
}

// targetSyntax is `IF [HOOK]`.
type targetSyntax struct {
	Pos    lexer.Position
	Name   *nameSyntax `parser:"@@"`
	Hook   *hookName   `parser:"@@?"`
	Tokens []lexer.Token
}

type hookName struct {
	Pos    lexer.Position
	Hook   string `parser:"@('ingress' | 'egress')"`
	Tokens []lexer.Token
}

type addSyntax struct {
	Rule    *ruleCmdSyntax    `parser:"  'rule' @@"`
	Element *elementCmdSyntax `parser:"| 'element' @@"`
}

type insertSyntax struct {
	Rule *ruleCmdSyntax `parser:"'rule' @@"`
}

type replaceSyntax struct {
	Rule *ruleCmdSyntax `parser:"'rule' @@"`
}

type deleteSyntax struct {
	Rule      *ruleCmdSyntax    `parser:"  'rule' @@"`
	Interface *nameSyntax       `parser:"| 'interface' @@"`
	Element   *elementCmdSyntax `parser:"| 'element' @@"`
	Set       *nameSyntax       `parser:"| 'set' @@"`
}

type resetSyntax struct {
	Target *targetSyntax `parser:"'counters' @@?"`
}

// ruleCmdSyntax is `IF HOOK [position H | handle H] [RULE]`.
type ruleCmdSyntax struct {
	Pos      lexer.Position
	Name     *nameSyntax   `parser:"@@"`
	Hook     *hookName     `parser:"@@"`
	Position *numberSyntax `parser:"( 'position' @@"`
	Handle   *numberSyntax `parser:"| 'handle' @@ )?"`
	Quick    quickRule     `parser:"( @@"`
	Rule     *ruleSyntax   `parser:"| @@ )?"`
	Tokens   []lexer.Token
}

type elementCmdSyntax struct {
	Pos    lexer.Position
	Name   *nameSyntax  `parser:"@@"`
	Value  *valueSyntax `parser:"@@"`
	Tokens []lexer.Token
}

// ruleSyntax is a rule in sfunnel's lenient order: match and statement
// items in any order, then the actions, then the comment.
//
// Actions may follow the word `actions` (sfunnel's form) or come straight
// after the matches and statements (nft's form: `udp dport 5 counter drop`).
type ruleSyntax struct {
	Pos       lexer.Position
	Items     []*itemSyntax   `parser:"( @@*"`
	ActionsKw *keywordSyntax  `parser:"  ( @@"`
	Actions   []*actionSyntax `parser:"      ( @@ ( ','? @@ )* )?"`
	NftForm   []*actionSyntax `parser:"  | (?= 'accept' | 'drop' | 'funnel' | 'unfunnel' | 'rewrite' | 'dnat' ) @@ ( ','? @@ )* )?"`
	Comment   *stringSyntax   `parser:"  ( 'comment' @@ )? )!"`
	Tokens    []lexer.Token
}

type stringSyntax struct {
	Pos    lexer.Position
	Value  string `parser:"@String"`
	Tokens []lexer.Token
}

type itemSyntax struct {
	Pos lexer.Position
	// nft's explicit protocol matches come before the bare family word, so
	// `ip protocol udp` is not read as `ip` followed by a stray `protocol`.
	IPProto  *wordSyntax    `parser:"  'ip' 'protocol' @@"`
	IP6Proto *wordSyntax    `parser:"| 'ip6' 'nexthdr' @@"`
	L4Proto  *wordSyntax    `parser:"| 'meta' 'l4proto' @@"`
	NFProto  *wordSyntax    `parser:"| 'meta' 'nfproto' @@"`
	Trace    *numberSyntax  `parser:"| 'meta' 'nftrace' 'set' @@"`
	Family   string         `parser:"| @('ip' | 'ip6')"`
	Addr     *addrSyntax    `parser:"| @@"`
	Proto    string         `parser:"| @('tcp' | 'udp')"`
	Port     *portSyntax    `parser:"| @@"`
	Flags    *flagsSyntax   `parser:"| 'flags' @@"`
	Mark     *markSyntax    `parser:"| @@"`
	Counter  *counterSyntax `parser:"| @@"`
	Tokens   []lexer.Token
}

type addrSyntax struct {
	Field  string       `parser:"@('saddr' | 'daddr')"`
	Neg    bool         `parser:"@'!='?"`
	Value  *valueSyntax `parser:"@@"`
	Tokens []lexer.Token
}

type portSyntax struct {
	Field  string       `parser:"@('sport' | 'dport')"`
	Neg    bool         `parser:"@'!='?"`
	Value  *valueSyntax `parser:"@@"`
	Tokens []lexer.Token
}

type flagsSyntax struct {
	Pos    lexer.Position
	Op     string   `parser:"@('==' | '!=')?"`
	Flags  []string `parser:"@Ident ( ('|' | ',') @Ident )*"`
	Mask   []string `parser:"( '/' @Ident ( ('|' | ',') @Ident )* )?"`
	Tokens []lexer.Token
}

type markSyntax struct {
	Kind   string        `parser:"@('meta' | 'ct') 'mark'"`
	Set    bool          `parser:"@'set'?"`
	Neg    bool          `parser:"@'!='?"`
	Value  *numberSyntax `parser:"@@"`
	Mask   *numberSyntax `parser:"( '/' @@ )?"`
	Tokens []lexer.Token
}

// counterSyntax accepts `counter packets N bytes M` as listed, so listings
// read back; the numbers are not restored.
type counterSyntax struct {
	Counter bool          `parser:"@'counter'"`
	Packets *numberSyntax `parser:"( 'packets' @@"`
	Bytes   *numberSyntax `parser:"  'bytes' @@ )?"`
}

type actionSyntax struct {
	Pos      lexer.Position
	Accept   bool          `parser:"  @'accept'"`
	Drop     bool          `parser:"| @'drop'"`
	Funnel   *funnelSyntax `parser:"| 'funnel' 'encap'? @@"`
	Unfunnel *protoSyntax  `parser:"| 'unfunnel' 'decap'? @@"`
	Rewrite  *protoSyntax  `parser:"| 'rewrite' @@"`
	DNAT     *dnatSyntax   `parser:"| 'dnat' 'to'? @@"`
	// Any other word is kept so the lowerer can name what it expected
	// (and what the word means in nft), wherever the rule is.
	Unknown string `parser:"| (?! 'comment' | 'actions' | 'ip' | 'ip6' | 'tcp' | 'udp' | 'saddr' | 'daddr' | 'sport' | 'dport' | 'flags' | 'meta' | 'ct' | 'counter' | 'packets' | 'bytes' | 'accept' | 'drop' | 'funnel' | 'unfunnel' | 'rewrite' | 'dnat' ) @Ident"`
	Tokens  []lexer.Token
}

type keywordSyntax struct {
	Pos    lexer.Position
	Word   string `parser:"@'actions'"`
	Tokens []lexer.Token
}

// wordSyntax is one word or number, checked when lowered (so that
// `ip protocol icmp` gets a message, not a syntax error).
type wordSyntax struct {
	Pos    lexer.Position
	Word   string `parser:"@(Ident | Number)"`
	Tokens []lexer.Token
}

type protoSyntax struct {
	Pos    lexer.Position
	Proto  string `parser:"@('tcp' | 'udp')"`
	Tokens []lexer.Token
}

type funnelSyntax struct {
	Proto  *protoSyntax         `parser:"@@"`
	Fields []*funnelFieldSyntax `parser:"@@*"`
}

type funnelFieldSyntax struct {
	Pos    lexer.Position
	Name   string        `parser:"(  @('sport' | 'dport' | 'seq' | 'ack' | 'window' | 'mss')"`
	Off    bool          `parser:"   ( @'off'"`
	Value  *numberSyntax `parser:"   | @@ )"`
	Flags  []string      `parser:"| 'flags' @Ident ( '|' @Ident )* )"`
	Tokens []lexer.Token
}

type dnatSyntax struct {
	Pos    lexer.Position
	Addr6B string        `parser:"(  '[' @IPv6 ']'"`
	Addr   string        `parser:"| @(IPv4 | IPv6) | @Var )"`
	Port   *numberSyntax `parser:"( ':' @@ )?"`
	Tokens []lexer.Token
}

type numberSyntax struct {
	Pos    lexer.Position
	Num    string `parser:"  @Number"`
	Var    string `parser:"| @Var"`
	Tokens []lexer.Token
}

// valueSyntax is an address, prefix, port, port range, list, @set or $var.
type valueSyntax struct {
	Pos    lexer.Position
	List   []*elemSyntax `parser:"(  '{' ( EOL | ',' )* ( @@ ( ( EOL | ',' )+ @@? )* )? '}'"`
	SetRef string        `parser:"| @SetRef"`
	Elem   *elemSyntax   `parser:"| @@ )"`
	Tokens []lexer.Token
}

type elemSyntax struct {
	Pos    lexer.Position
	Addr   string `parser:"(  @(IPv4 | IPv6)"`
	Len    string `parser:"   ( '/' @Number )?"`
	Lo     string `parser:"| @Number"`
	Hi     string `parser:"   ( '-' @Number )?"`
	Var    string `parser:"| @Var"`
	Name   string `parser:"| @Ident )"`
	Tokens []lexer.Token
}
