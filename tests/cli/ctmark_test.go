package cli

import (
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// ct mark values are the connection mark itself: a value or mask outside
// the ct mark mask is refused at the token, naming the mask; a mask that
// can't carry values is a usage error before anything is applied.
func TestCtMarkErrors(t *testing.T) {
	a, _ := topology(t)
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"add", "rule", "veth0", "ingress", "udp", "dport", "4739", "ct", "mark", "set", "0x1", "counter"}, 1,
			"<cmdline>:1:39-53: Error: ct mark set 0x1 has bits outside the ct mark mask 0x00ff0000 (--ct-mark-mask): only those bits of the connection mark are sfunnel's\n" +
				"add rule veth0 ingress udp dport 4739 ct mark set 0x1 counter\n" +
				"                                      ^^^^^^^^^^^^^^^\n"},
		{[]string{"add", "rule", "veth0", "egress", "ct", "mark", "0x1", "actions", "accept"}, 1,
			"<cmdline>:1:23-33: Error: ct mark 0x1 has bits outside the ct mark mask 0x00ff0000 (--ct-mark-mask): sfunnel sees only those bits of the connection mark\n" +
				"add rule veth0 egress ct mark 0x1 actions accept\n" +
				"                      ^^^^^^^^^^^\n"},
		{[]string{"add", "rule", "veth0", "egress", "ct", "mark", "0x10000/0x1ff0000", "actions", "accept"}, 1,
			"<cmdline>:1:23-47: Error: ct mark mask 0x1ff0000 has bits outside the ct mark mask 0x00ff0000 (--ct-mark-mask): sfunnel sees only those bits of the connection mark\n" +
				"add rule veth0 egress ct mark 0x10000/0x1ff0000 actions accept\n" +
				"                      ^^^^^^^^^^^^^^^^^^^^^^^^^\n"},
		{[]string{"--ct-mark-mask", "0xff", "add", "rule", "veth0", "ingress", "ct", "mark", "set", "0x10000"}, 1,
			"<cmdline>:1:24-42: Error: ct mark set 0x10000 has bits outside the ct mark mask 0x000000ff (--ct-mark-mask): only those bits of the connection mark are sfunnel's\n" +
				"add rule veth0 ingress ct mark set 0x10000\n" +
				"                       ^^^^^^^^^^^^^^^^^^^\n"},
		{[]string{"add", "rule", "veth0", "ingress", "ct", "mark", "set", "0x10000/0xf0000"}, 1,
			"<cmdline>:1:24-50: Error: ct mark set writes all the bits of the ct mark mask 0x00ff0000 (--ct-mark-mask) at once: /0xf0000 is not that mask\n" +
				"add rule veth0 ingress ct mark set 0x10000/0xf0000\n" +
				"                       ^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"},
		{[]string{"--ct-mark-mask", "0xffffffff", "list", "ruleset"}, 2, ""},
		{[]string{"--ct-mark-mask", "0", "list", "ruleset"}, 2, ""},
	} {
		r := sfunnel(t, "", append([]string{"--netns", a.Name}, c.args...)...)
		if r.code != c.code || (c.want != "" && r.stderr != c.want) || (c.want == "" && r.stderr == "") {
			t.Errorf("sfunnel %v: exit %d\n%s\nwant exit %d\n%s", c.args, r.code, r.stderr, c.code, c.want)
		}
	}
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != "" {
		t.Errorf("refused rules changed the ruleset:\n%s", got)
	}
}

// `nft flush ruleset` (what `systemctl reload nftables` runs) removes
// sfunnel's nftables table: `list ruleset` says so in a comment that keeps
// the listing valid input, and the next apply puts the table back.
func TestNftFlushDetectedAndHealed(t *testing.T) {
	testenv.RequireCommand(t, "nft")
	a, _ := topology(t)
	conf := "flush ruleset\ninterface veth0 {\n\tingress {\n\t\tudp dport 4739 ct mark set 0x10000\n\t}\n\tegress {\n\t\tct mark 0x10000 counter actions accept\n\t}\n}\n"
	mustSfunnel(t, conf, "--netns", a.Name, "-f", "-")
	a.Run(t, "nft", "list", "table", "inet", "sfunnel")
	clean := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset")
	if strings.Contains(clean, "warning") {
		t.Fatalf("warning with the table in place:\n%s", clean)
	}

	a.Run(t, "nft", "flush", "ruleset")
	got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset")
	warning := "# warning: nftables table inet sfunnel is missing (nft flush ruleset?): ct mark rules do not work until the ruleset is applied again\n"
	if got != warning+clean {
		t.Errorf("list ruleset after nft flush ruleset:\n%s\nwant the warning, then\n%s", got, clean)
	}
	// The listing, warning included, is valid input.
	mustSfunnel(t, "flush ruleset\n"+got, "--netns", a.Name, "-c", "-f", "-")
	// -j has no place for it: it goes to stderr.
	if r := sfunnel(t, "", "--netns", a.Name, "-j", "list", "ruleset"); r.code != 0 || r.stderr != "Warning: "+strings.TrimPrefix(warning, "# warning: ") || !strings.HasPrefix(r.stdout, `{"nftables"`) {
		t.Errorf("-j list ruleset after nft flush ruleset: exit %d\nstdout %s\nstderr %s", r.code, r.stdout, r.stderr)
	}

	// The next apply heals.
	mustSfunnel(t, conf, "--netns", a.Name, "-f", "-")
	if out := a.Run(t, "nft", "list", "table", "inet", "sfunnel"); !strings.Contains(out, "ct_save") {
		t.Errorf("table not restored:\n%s", out)
	}
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != clean {
		t.Errorf("after the next apply:\n%s\nwant\n%s", got, clean)
	}
}
